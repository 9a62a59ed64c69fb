"""coevo's merge engine against mergekit on the same models, side by side in one run.

Three Qwen2-0.5B-shaped bf16 models are built locally (base = seeded noise, experts = base +
seeded noise; 494M parameters, 988 MB each) and a twice-as-deep one (48 layers) for memory.
Every merge runs in a fresh process, at the same thread count, with the page cache warm and
no dirty pages waiting (`sync` first: another run's writeback throttles a writer on this
machine by seconds); rounds are interleaved so drift hits every mode alike; wall time and
peak RSS come from the process's own rusage (`wait4`; for the sandboxes, the result's `duration_s` and
`peak_memory_mb`, which the harness measures the same way).

  * mergekit 0.1.5 in its own venv (`dtype: float32`, `out_dtype: bfloat16`, weight 1 each)
    against coevo's built-ins in-process, and whether their outputs are equal value by value;
  * one merge program (the same source) in-process, in the process sandbox and in a warm
    Docker container: what the sandbox costs;
  * the default sandbox pool (`[sandbox]` defaults: 2 workers, cores shared among them) against
    one worker with every core: merges per hour;
  * the engine's floor on this machine: reading the three models and writing one, measured
    twice a round (once just before coevo's built-in merges, in the state they meet). The ratio
    uses the fastest read and the fastest write of the run: what the machine can do, so the
    strictest denominator (one model's write took 0.2-2.7 s here, even right after `sync`);
    the medians are printed beside it.

    .venv/bin/python bench/merge_vs_mergekit.py [--runs 2] [--threads N] [--models DIR] [--only METHOD]

The mergekit venv is created on first use (`--mergekit-venv`, default .venv-mergekit, from
PyPI: mergekit 0.1.5 with the CPU torch of this venv's version).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MERGEKIT = "mergekit==0.1.5"
TA_SCALE = 0.5
TIES_DENSITY = 0.2

# The merge programs the sandbox comparison runs (the same source in every mode). The first
# computes exactly the built-in task arithmetic; the second is TIES as a generated program
# would write it (one kthvalue per task vector), not coevo's built-in.
TA_PROGRAM = """import torch


def merge(task_vectors, *, name, base):
    merged = task_vectors[0] + task_vectors[1]
    return merged.mul_(0.5)
"""
TIES_PROGRAM = """import torch


def merge(task_vectors, *, name, base):
    kept = []
    for tv in task_vectors:
        k = max(1, int(0.2 * tv.numel()))
        magnitude = tv.abs().flatten()
        threshold = magnitude.kthvalue(magnitude.numel() - k + 1).values
        kept.append(tv * (tv.abs() >= threshold))
    stacked = torch.stack(kept)
    sign = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0)
    agree = torch.sign(stacked) == sign
    count = agree.sum(dim=0).clamp(min=1)
    return (stacked * agree).sum(dim=0) / count
"""
PROGRAMS = {"task arithmetic": TA_PROGRAM, "TIES program": TIES_PROGRAM}

# mergekit's command line with a stable argsort (mergekit's `magnitude` sparsification sorts
# with torch's default, unstable sort, whose order among equal magnitudes torch leaves open).
STABLE_MERGEKIT = """import sys, torch
argsort = torch.argsort
torch.argsort = lambda *args, **kwargs: argsort(*args, **{**kwargs, "stable": True})
from mergekit.scripts.run_yaml import main
sys.argv = ["mergekit-yaml", *sys.argv[1:]]
main()
"""


# --- models ------------------------------------------------------------------------------


def build_models(root: Path, layers: int) -> tuple[Path, list[Path]]:
    """Base and two experts shaped like Qwen2-0.5B with `layers` layers (cached in `root`),
    made in a child process: this one must stay small, since a child forked from it starts
    with its peak RSS (what every measurement below reads)."""
    base, experts = root / "base", [root / "expert1", root / "expert2"]
    if not (root / "done").is_file():
        subprocess.run([sys.executable, __file__, "--build", str(root), str(layers)], check=True)
    from merging.writer import share_readable

    share_readable(root)  # the Docker sandbox runs as an unprivileged user
    return base, experts


def make_models(root: Path, layers: int) -> None:
    base, experts = root / "base", [root / "expert1", root / "expert2"]
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=layers, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, torch_dtype="bfloat16",
        architectures=["Qwen2ForCausalLM"], max_position_embeddings=32768,
    )
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    shapes.pop("lm_head.weight", None)  # tied to the embeddings
    print(f"building {root} ({layers} layers, {len(shapes)} tensors)", file=sys.stderr)
    generator = torch.Generator().manual_seed(0)
    tensors = {n: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}
    for i, model_dir in enumerate([base, *experts]):
        model_dir.mkdir(parents=True, exist_ok=True)
        if i == 0:
            weights = tensors
        else:
            noise = torch.Generator().manual_seed(i)
            weights = {
                n: (t.float() + torch.randn(t.shape, generator=noise) * 0.002).to(torch.bfloat16)
                for n, t in tensors.items()
            }
        save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(model_dir)
    (root / "done").write_text("")


# --- running one merge ---------------------------------------------------------------------


def measured(command: list[str], env: dict[str, str]) -> tuple[float, float, dict[str, Any]]:
    """Run `command`; its wall time (s), peak RSS (MiB, from wait4) and the JSON object its
    last stdout line holds, if any."""
    os.sync()  # no dirty backlog from the last run: its writeback must not throttle this one
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=err)
        _, status, rusage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        lines = out.read().decode(errors="replace").strip().splitlines()
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{command[0]} failed: {err.read().decode(errors='replace')[-2000:]}")
    said = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return wall, rusage.ru_maxrss / 1024, said


def child_env(threads: int) -> dict[str, str]:
    from sandbox.jobs import TORCH_ENV, thread_env

    return {**os.environ, **thread_env(threads), **TORCH_ENV, "PYTHONPATH": str(ROOT)}


def mergekit_merge(
    venv: Path, method: str, base: Path, experts: list[Path], out: Path, threads: int, *, stable: bool = False
) -> tuple[float, float]:
    """mergekit's merge in its venv; with `stable`, its `torch.argsort` made stable (ties in
    index order), which shows whether outputs differ only where magnitudes tie."""
    parameters = {"weight": 1.0, **({"density": TIES_DENSITY} if method == "ties" else {})}
    config = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": parameters} for e in experts],
        "parameters": {"lambda": TA_SCALE if method == "task_arithmetic" else 1.0},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    path = out.parent / f"{out.name}.yml"
    path.write_text(json.dumps(config))  # JSON is YAML
    shutil.rmtree(out, ignore_errors=True)
    command = [str(venv / "bin" / "mergekit-yaml"), str(path), str(out), "--quiet"]
    if stable:
        command[:1] = [str(venv / "bin" / "python"), "-c", STABLE_MERGEKIT]
    wall, peak, _ = measured(command, child_env(threads))
    return wall, peak


def coevo_merge(spec: dict[str, Any], threads: int) -> tuple[float, float, float]:
    """A merge in a fresh process (`--child`): a built-in method or a program's source. Its
    wall time, peak RSS, and the time of `merge_models` itself (after the imports)."""
    shutil.rmtree(spec["out"], ignore_errors=True)  # as for mergekit: no old dir to replace
    wall, peak, said = measured([sys.executable, __file__, "--child", json.dumps({**spec, "threads": threads})], child_env(threads))
    return wall, peak, said["merge_s"]


def run_child(spec: dict[str, Any]) -> None:
    import torch

    from merging.apply import merge_models
    from merging.methods import make_merge_fn

    torch.set_num_threads(spec["threads"])
    if "source" in spec:  # the bench's own program, trusted: plain exec, as a user's script would
        namespace: dict[str, Any] = {}
        exec(compile(spec["source"], "program", "exec"), namespace)  # noqa: S102
        merge_fn = namespace["merge"]
    else:
        merge_fn = make_merge_fn(spec["method"], **spec["params"])
    start = time.perf_counter()
    merge_models(merge_fn, Path(spec["base"]), [Path(e) for e in spec["experts"]], Path(spec["out"]))
    print(json.dumps({"merge_s": time.perf_counter() - start}))


def floor(base: Path, experts: list[Path], out: Path) -> tuple[float, float]:
    """Reading the three models from page cache and writing one model's bytes."""
    buffer = bytearray(1 << 24)
    start = time.perf_counter()
    for model_dir in [base, *experts]:
        with open(model_dir / "model.safetensors", "rb") as file:
            while file.readinto(buffer):
                pass
    read = time.perf_counter() - start
    size = (base / "model.safetensors").stat().st_size
    chunk = bytes(1 << 24)
    os.sync()
    start = time.perf_counter()
    with open(out, "wb") as file:
        for _ in range(0, size, len(chunk)):
            file.write(chunk)
        file.flush()
    write = time.perf_counter() - start
    out.unlink()
    return read, write


def differing(a: Path, b: Path) -> tuple[int, int]:
    """Values that differ between two model dirs' weights, of all values."""
    import torch

    from merging.io import open_weights

    differ = total = 0
    with open_weights(a) as left, open_weights(b) as right:
        for name in left:
            x, y = left.view(name), right.view(name)
            differ += int((x.view(torch.int16) != y.view(torch.int16)).sum()) if x.dtype == torch.bfloat16 else int((x != y).sum())
            total += x.numel()
    return differ, total


def ensure_mergekit(venv: Path) -> Path:
    if (venv / "bin" / "mergekit-yaml").is_file():
        return venv
    import torch

    print(f"creating {venv} with {MERGEKIT}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    torch_version = torch.__version__.split("+")[0]
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"torch=={torch_version}", MERGEKIT], check=True)
    return venv


# --- the report ----------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="rounds per mode (medians are reported)")
    parser.add_argument("--threads", type=int, default=0, help="threads per merge (0 = all cores)")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "coevo-bench-models")
    parser.add_argument("--mergekit-venv", type=Path, default=ROOT / ".venv-mergekit")
    parser.add_argument("--pool-jobs", type=int, default=6, help="merges per pool configuration")
    parser.add_argument("--only", choices=["task_arithmetic", "ties"],
                        help="just this built-in against mergekit and the floor (no sandboxes, no pool)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--build", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(json.loads(args.child))
        return 0
    if args.build:
        make_models(Path(args.build[0]), int(args.build[1]))
        return 0

    from sandbox.config import SandboxConfig
    from sandbox.docker_runner import DockerRunner
    from sandbox.jobs import MergeJob, SandboxLimits, available_cpus
    from sandbox.process_runner import ProcessRunner
    from sandbox.runners import run_many, runner_from_config

    threads = args.threads or available_cpus()
    venv = ensure_mergekit(args.mergekit_venv)
    base, experts = build_models(args.models / "qwen2-0.5b", 24)
    deep_base, deep_experts = build_models(args.models / "qwen2-0.5b-x2", 48)
    work = Path(tempfile.mkdtemp(prefix="coevo-bench-"))  # not under --models: Docker mounts that
    builtins = {"task_arithmetic": {"scale": TA_SCALE}, "ties": {"density": TIES_DENSITY}}
    if args.only:
        builtins = {args.only: builtins[args.only]}
    programs = {} if args.only else PROGRAMS
    # (wall s, peak MiB[, the merge's own s: merge_models after the imports, or the sandbox's
    # duration_s inside the job; the wall time of a sandbox run is the caller's, all in])
    results: dict[tuple[str, str], list[tuple[float, ...]]] = {}

    def record(key: tuple[str, str], value: tuple[float, ...]) -> None:
        results.setdefault(key, []).append(value)
        inner = f" (merge {value[2]:.2f} s)" if len(value) > 2 else ""
        print(f"  {key[0]:<16} {key[1]:<22} {value[0]:7.2f} s {value[1]:8.0f} MiB{inner}", file=sys.stderr)

    def spec(out: Path, base_dir: Path = base, expert_dirs: list[Path] = experts, **what: Any) -> dict[str, Any]:
        return {"base": str(base_dir), "experts": [str(e) for e in expert_dirs], "out": str(out), **what}

    limits = SandboxLimits(timeout_s=1200, memory_mb=16_000, max_output_mb=4096, cpus=float(threads))
    sandboxes: dict[str, Any] = {}
    if programs:  # (--only needs neither sandbox, nor a Docker daemon)
        docker = DockerRunner(limits, pool_size=1, jobs_per_container=10_000, input_roots=[args.models], scratch_dir=work / "scratch")
        docker.prewarm(base, experts)
        sandboxes = {"process sandbox": ProcessRunner(limits), "Docker warm pool": docker}

    def measure_floor() -> None:
        read, write = floor(base, experts, work / "floor.bin")
        results.setdefault(("floor", "read"), []).append((read, 0.0))
        results.setdefault(("floor", "write"), []).append((write, 0.0))

    for model_dir in [base, *experts, deep_base, *deep_experts]:  # page cache warm
        floor(model_dir, [], work / "warm")
    for round_ in range(args.runs):
        print(f"round {round_ + 1}/{args.runs}", file=sys.stderr)
        for method, params in builtins.items():
            record((method, "mergekit"), mergekit_merge(venv, method, base, experts, work / f"mk-{method}", threads))
            measure_floor()  # in the state coevo's merge meets, right after a merge wrote its output
            record((method, "coevo in-process"), coevo_merge(spec(work / f"coevo-{method}", method=method, params=params), threads))
            record((method, "mergekit 2x model"), mergekit_merge(venv, method, deep_base, deep_experts, work / "mk-deep", threads))
            record((method, "coevo 2x model"), coevo_merge(spec(work / "coevo-deep", deep_base, deep_experts, method=method, params=params), threads))
        for label, source in programs.items():
            record((label, "program in-process"), coevo_merge(spec(work / "program", source=source), threads))
            for name, runner in sandboxes.items():
                shutil.rmtree(work / "sandboxed", ignore_errors=True)
                os.sync()
                start = time.perf_counter()
                result = runner.run(MergeJob(source, base, experts, work / "sandboxed"))
                wall = time.perf_counter() - start
                assert result.verdict == "ok", (name, result.reason)
                record((label, name), (wall, result.peak_memory_mb, result.duration_s))
        measure_floor()

    equal = {method: differing(work / f"mk-{method}", work / f"coevo-{method}") for method in builtins}
    equal_stable = None
    if "ties" in builtins:
        print("mergekit TIES with a stable argsort", file=sys.stderr)
        mergekit_merge(venv, "ties", base, experts, work / "mk-ties-stable", threads, stable=True)
        equal_stable = differing(work / "mk-ties-stable", work / "coevo-ties")

    # Throughput of the pool: the defaults, against one worker with every core.
    pools = {"default (2 workers, cores shared)": SandboxConfig(runner="docker"), "1 worker, all cores": SandboxConfig(runner="docker", workers=1, cpus=float(available_cpus()))}
    throughput = {}
    for label, config in pools.items() if programs else []:
        config = config.model_copy(update={"timeout_s": 1200.0, "memory_mb": 8000})
        runner = runner_from_config(config, scratch_dir=work / "pool-scratch", input_roots=[args.models])
        try:
            jobs = [MergeJob(TA_PROGRAM, base, experts, work / f"pool-{i % 4}") for i in range(config.workers)]
            run_many(runner, jobs, workers=config.workers)  # containers up and warm
            jobs = [MergeJob(TA_PROGRAM, base, experts, work / f"pool-{i % 4}") for i in range(args.pool_jobs)]
            start = time.perf_counter()
            outcomes = run_many(runner, jobs, workers=config.workers, ahead=config.workers)
            wall = time.perf_counter() - start
            assert all(r.verdict == "ok" for r in outcomes), [r.reason for r in outcomes]
            throughput[label] = (args.pool_jobs / wall * 3600, config.workers, config.job_cpus())
        finally:
            runner.close()
    if programs:
        docker.close()
    shutil.rmtree(work, ignore_errors=True)

    def cell(key: tuple[str, str], index: int = 0) -> str:
        runs = results.get(key, [])
        wall, peak = median([r[index] for r in runs]), median([r[1] for r in runs])
        return f"{wall:.1f} s, {peak / 1024:.2f} GiB" if peak else f"{wall:.2f} s"

    def value(key: tuple[str, str], index: int = 0) -> float:
        return median([r[index] for r in results[key]])

    def ratio(key: tuple[str, str], ref: tuple[str, str], index: int = 0, ref_index: int | None = None) -> float:
        return value(key, index) / value(ref, index if ref_index is None else ref_index)

    def best(key: tuple[str, str]) -> float:
        return min(r[0] for r in results[key])

    io_floor = best(("floor", "read")) + best(("floor", "write"))
    print(f"\n{threads} threads per merge; medians of {args.runs} interleaved rounds; the floor, fastest of the "
          f"run's {len(results[('floor', 'read')])}: reading the 3 models from page cache {best(('floor', 'read')):.2f} s + writing one "
          f"{best(('floor', 'write')):.2f} s = {io_floor:.2f} s (medians {value(('floor', 'read')):.2f} s + "
          f"{value(('floor', 'write')):.2f} s)\n")
    print("| merge (base + 2 experts, 0.5B bf16) | mergekit | coevo in-process | time coevo/mergekit "
          "| coevo's merge_models alone | merge_models / floor | peak memory coevo/mergekit | values differing "
          "| 2x model, mergekit | 2x model, coevo |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method in builtins:
        d, total = equal[method]
        print(f"| {method} | {cell((method, 'mergekit'))} | {cell((method, 'coevo in-process'))} "
              f"| {ratio((method, 'coevo in-process'), (method, 'mergekit')):.2f} "
              f"| {value((method, 'coevo in-process'), 2):.2f} s | {value((method, 'coevo in-process'), 2) / io_floor:.1f} "
              f"| {ratio((method, 'coevo in-process'), (method, 'mergekit'), 1):.2f} "
              f"| {d} of {total} | {cell((method, 'mergekit 2x model'))} | {cell((method, 'coevo 2x model'))} |")
    if equal_stable is not None:
        d, total = equal_stable
        print(f"\nties against mergekit with a stable argsort (ties at the trim threshold kept in index order): "
              f"{d} of {total} values differ")
    if not programs:
        return 0
    print("\n| merge program | in-process (merge_models alone) | process sandbox, caller's wall (inside the job) "
          "| Docker warm pool, caller's wall (inside the job) | Docker caller's wall / in-process |")
    print("|---|---|---|---|---|")
    for label in programs:
        inside = {name: f"{cell((label, name))} ({value((label, name), 2):.1f} s)" for name in sandboxes}
        print(f"| {label} | {cell((label, 'program in-process'), 2)} | {inside['process sandbox']} "
              f"| {inside['Docker warm pool']} "
              f"| {ratio((label, 'Docker warm pool'), (label, 'program in-process'), 0, 2):.2f} |")
    print(f"\n| sandbox pool (Docker, task arithmetic, {args.pool_jobs} merges) | workers x threads | merges per hour |")
    print("|---|---|---|")
    for label, (per_hour, workers, cpus) in throughput.items():
        print(f"| {label} | {workers} x {cpus:g} | {per_hour:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
