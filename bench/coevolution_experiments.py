"""The population-mode experiments of EXPERIMENTS.md, on the embedded zoo, over several seeds.

Four comparisons, each arm run for every seed with everything else at the mode's defaults:

  acdc-tasks      acdc (coevolving tasks, DNS) vs a static task set vs random selection
  cycleqd-axes    cycleqd with a cyclic quality axis vs a fixed one
  mutation        acdc with SVD mutation (the paper's) vs Gaussian noise vs none
  crossover       acdc with the papers' crossover vs a generated merge algorithm
  acdc-tasks-long the first comparison over 24 generations instead of the default 8

The sessions' own coverage is measured on their own (moving) task pools, so arms are compared on
a fixed held-out benchmark instead: the zoo's test split plus harder and composed families the
sessions never see (seed 10_000). Each generation's greedy team (picked on the session's own
tasks, as in AC/DC) answers the benchmark; a benchmark task is covered when a team member's
answer is exactly right. Writes `results.json`, a markdown summary and SVG plots (matplotlib, as
`coevo serve` draws them) to --out.

    python bench/coevolution_experiments.py --seeds 0 1 2 --out experiments/ [--only acdc-tasks ...]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from agents.answerer import Answerer
from agents.judge import exact_match
from agents.tasks import load_tasks
from archive_store import Archive
from coevo.web import plots
from coevo.zoo.build import default_zoo_dir, ensure_zoo
from coevo.zoo.task_families import procedural_family

ARMS: dict[str, dict[str, str]] = {
    "acdc-tasks": {
        "acdc": 'mode = "acdc"\n',
        "static tasks": 'mode = "acdc"\n[tasks]\ncoevolve = false\n',
        "random selection": 'mode = "acdc"\n[population]\nselection = "random"\n',
    },
    "cycleqd-axes": {
        "cyclic": 'mode = "cycleqd"\n',
        "fixed": 'mode = "cycleqd"\n[population]\ncyclic = false\n',
    },
    "mutation": {
        "svd (acdc)": 'mode = "acdc"\n',
        "gaussian": 'mode = "acdc"\n[population]\nmutation = "gaussian"\n',
        "none": 'mode = "acdc"\n[population]\nmutation = "none"\n',
    },
    "crossover": {
        "paper": 'mode = "acdc"\n',
        "generated algorithm": 'mode = "acdc"\n[population]\ncrossover = "algorithm"\nalgorithm = "sample"\nalgorithms_from = "{algorithms}"\n',
    },
}
# The same arms over a longer horizon (CLI overrides added to the launch).
ARMS["acdc-tasks-long"] = ARMS["acdc-tasks"]
LAUNCH_ARGS = {"acdc-tasks-long": ["--generations", "24"]}
CHILDREN_MEASURED = 4
# Held-out benchmark families: harder and composed variants of the zoo's skills.
BENCHMARK_PARAMS = (
    {"ops": ["upper"], "word_lo": 6, "word_hi": 6, "alphabet": "abcdefghij"},
    {"ops": ["reverse"], "word_lo": 6, "word_hi": 6, "alphabet": "abcdefghij"},
    {"ops": ["copy"], "word_lo": 7, "word_hi": 8, "alphabet": "abcdefghij"},
    {"ops": ["add"], "a_lo": 60, "a_hi": 99, "b_lo": 0, "b_hi": 9},
    {"ops": ["reverse", "upper"], "word_lo": 3, "word_hi": 4, "alphabet": "abcdefghij"},
)


def benchmark(zoo: Path, per_family: int = 40) -> list[tuple[str, str, str]]:
    """(group, prompt, answer): the zoo's test split and the held-out harder families."""
    items = [(f"zoo-test/{t.skill}", t.prompt, t.answer) for t in load_tasks(zoo / "tasks") if t.split == "test"]
    for params in BENCHMARK_PARAMS:
        family = procedural_family(params, family_id="bench", rng=random.Random(10_000), n_instances=per_family)
        items += [(f"held-out/{family.name}", i["prompt"], i["solution"]) for i in family.instances]
    return items


def run_arm(workdir: Path, config_text: str, seed: int, zoo: Path, log: Path, args: list[str]) -> float:
    """Run one session in a fresh workdir; its config is the arm's text with the seed and the zoo added."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    lines = config_text.splitlines()
    first_section = next((i for i, line in enumerate(lines) if line.startswith("[")), len(lines))
    # Top-level keys must come before any [section] in TOML.
    text = "\n".join([*lines[:first_section], f"seed = {seed}", "[zoo]", f'dir = "{zoo}"', *lines[first_section:]]) + "\n"
    config = workdir.parent / f"{workdir.name}.toml"
    config.write_text(text)
    started = time.time()
    with log.open("w") as out:
        subprocess.run([sys.executable, "-m", "coevo", "launch", str(config), "--workdir", str(workdir), *args],
                       check=True, stdout=out, stderr=subprocess.STDOUT)
    return time.time() - started


def measure_run(workdir: Path, judge: Answerer, bench: list[tuple[str, str, str]]) -> dict:
    """Per generation: own-pool coverage (as archived) and the team's benchmark coverage."""
    with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
        sid = archive.scalar("select session_id from sessions where status = 'finished' order by started_at desc limit 1")
        metrics = archive.records("select * from generation_metrics where session_id = ? order by generation", [sid])
        paths = dict(archive.query("select model_id, path from models")[1])
        final = archive.records("select model_id, path from models where session_id = ? and name like 'cycleqd-final%'", [sid])
        # Up to CHILDREN_MEASURED children per generation (the first by id) answer the benchmark too.
        children = archive.query(
            "select generation, model_id from models where session_id = ? and kind = 'merged' and name like 'g%' "
            "and discarded_reason is null qualify row_number() over (partition by generation order by model_id) <= ? "
            "order by 1, 2", [sid, CHILDREN_MEASURED],
        )[1]
        parents_of = {m: p for m, p in archive.query("select model_id, parent_ids from models")[1]}
    solved_cache: dict[str, set[int]] = {}

    def solved(model_id: str, path: str) -> set[int]:
        if model_id not in solved_cache:
            judge.load(Path(path))
            answers = judge.answers([p for _, p, _ in bench])
            solved_cache[model_id] = {i for i, (a, (_, _, ref)) in enumerate(zip(answers, bench, strict=True)) if exact_match(a, ref)}
        return solved_cache[model_id]

    child_scores: dict[int, list[float]] = {}
    child_gain: dict[int, list[float]] = {}
    for generation, model_id in children:
        score = len(solved(model_id, paths[model_id])) / len(bench)
        parents = [len(solved(p, paths[p])) / len(bench) for p in parents_of[model_id]]
        child_scores.setdefault(generation, []).append(score)
        child_gain.setdefault(generation, []).append(score - max(parents))
    rows = []
    for m in metrics:
        team = json.loads(m["team"])
        covered = set().union(*(solved(t, paths[t]) for t in team)) if team else set()
        best_single = max((len(solved(t, paths[t])) for t in team), default=0)
        rows.append({
            "generation": m["generation"], "own_coverage": m["population_coverage"], "own_team_coverage": m["team_coverage"],
            "n_tasks": m["n_tasks"], "bench_team_coverage": len(covered) / len(bench), "bench_best_single": best_single / len(bench),
            "children_ok": m["children_ok"], "children": m["children"],
            "children_bench_mean": _mean(child_scores.get(m["generation"], [])),
            "children_bench_best": max(child_scores.get(m["generation"], []), default=None),
            "children_minus_best_parent": _mean(child_gain.get(m["generation"], [])),
        })
    result = {"generations": rows}
    if final:
        result["merged_elites_bench"] = len(solved(final[0]["model_id"], final[0]["path"])) / len(bench)
    last_team = json.loads(metrics[-1]["team"])
    result["final_team_children"] = sum("/g" in t for t in last_team)
    return result


def _mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def svg_plot(path: Path, title: str, series: dict[str, list[float]], ylabel: str, first: int = 0) -> None:
    """A line chart per generation (mean over seeds), drawn by coevo's plotting (matplotlib)."""
    path.write_text(plots.generation_lines(title, series, ylabel, first=first) + "\n")


def summarise(results: dict, out: Path) -> str:
    lines = []
    for experiment, arms in results.items():
        lines += [f"### {experiment}", "", "| arm | seeds | held-out coverage, team of 3: gen 0 -> last | best team member, last | own-pool coverage, last | children: mean held-out score | children: best held-out score | child minus its best parent | children in final team | minutes per run |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        series = {}
        for arm, runs in arms.items():
            first = [r["generations"][0]["bench_team_coverage"] for r in runs.values()]
            last = [r["generations"][-1]["bench_team_coverage"] for r in runs.values()]
            single = [r["generations"][-1]["bench_best_single"] for r in runs.values()]
            own = [r["generations"][-1]["own_coverage"] for r in runs.values()]
            kids = [r["final_team_children"] for r in runs.values()]
            minutes = [r["seconds"] / 60 for r in runs.values()]
            child_mean = [_mean([g["children_bench_mean"] for g in r["generations"] if g.get("children_bench_mean") is not None]) for r in runs.values()]
            child_best = [max((g["children_bench_best"] for g in r["generations"] if g.get("children_bench_best") is not None), default=0.0) for r in runs.values()]
            gain = [_mean([g["children_minus_best_parent"] for g in r["generations"] if g.get("children_minus_best_parent") is not None]) for r in runs.values()]
            lines.append(
                f"| {arm} | {len(runs)} | {_pct(first)} -> {_pct(last)} | {_pct(single)} | {_pct(own)} | "
                f"{_pct([v for v in child_mean if v is not None])} | {_pct(child_best)} | {_pct([v for v in gain if v is not None], signed=True)} | "
                f"{statistics.mean(kids):.1f} | {statistics.mean(minutes):.1f} |"
            )
            n = min(len(r["generations"]) for r in runs.values())
            series[arm] = [statistics.mean(r["generations"][g]["bench_team_coverage"] for r in runs.values()) for g in range(n)]
            merged = [r["merged_elites_bench"] for r in runs.values() if "merged_elites_bench" in r]
            if merged:
                lines.append(f"| {arm}: merged elites (one model) | {len(merged)} | {_pct(merged)} | | | | | | | |")
        plot = out / f"{experiment}.svg"
        svg_plot(plot, f"{experiment}: held-out coverage of the greedy team of 3 (mean over seeds)", series, "coverage %")
        children = {
            arm: [statistics.mean(r["generations"][g]["children_bench_mean"] for r in runs.values())
                  for g in range(1, min(len(r["generations"]) for r in runs.values()))
                  if all(r["generations"][g].get("children_bench_mean") is not None for r in runs.values())]
            for arm, runs in arms.items()
        }
        child_plot = out / f"{experiment}-children.svg"
        svg_plot(child_plot, f"{experiment}: mean held-out score of each generation's children", children, "score %", first=1)
        lines += ["", f"![{experiment}]({plot.name}) ![{experiment} children]({child_plot.name})", ""]
    return "\n".join(lines)


def _pct(values: list[float], signed: bool = False) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.mean(values)
    sd = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:+.1f} ± {sd:.1f}" if signed else f"{mean:.1f} ± {sd:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("experiments"))
    parser.add_argument("--only", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--zoo", type=Path, default=None, help="zoo dir (default: the cached embedded zoo)")
    parser.add_argument("--remeasure", action="store_true", help="measure the finished runs again (no new sessions)")
    parser.add_argument("--plots-only", action="store_true", help="redraw the plots from --out's results.json and stop")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.plots_only:
        done = json.loads((out / "results.json").read_text())
        summarise({e: done[e] for e in args.only if e in done}, out)
        return
    zoo = ensure_zoo(args.zoo or default_zoo_dir(0), seed=0)
    bench = benchmark(zoo)
    judge = Answerer(zoo / "base", batch_size=512)
    results_path = out / "results.json"
    results: dict = json.loads(results_path.read_text()) if results_path.is_file() else {}
    algorithms = out / "selfdev" / "archive.duckdb"
    if "crossover" in args.only and not algorithms.is_file():
        print("[experiments] a short selfdev session writes the generated algorithms the crossover arm draws from", flush=True)
        (out / "selfdev.toml").write_text(f'seed = 0\n[zoo]\ndir = "{zoo}"\n[session]\niterations = 1\n[generator]\nprograms_per_iteration = 32\n[dpo]\nenabled = false\n')
        with (out / "selfdev.log").open("w") as log:
            subprocess.run([sys.executable, "-m", "coevo", "launch", str(out / "selfdev.toml"), "--workdir", str(out / "selfdev")],
                           check=True, stdout=log, stderr=subprocess.STDOUT)
    for experiment in args.only:
        for arm, text in ARMS[experiment].items():
            for seed in args.seeds:
                key = f"seed{seed}"
                slug = f"{experiment}-{arm}".replace(" ", "_").replace("(", "").replace(")", "")
                workdir = out / "runs" / f"{slug}-s{seed}"
                done = results.get(experiment, {}).get(arm, {}).get(key)
                if done is not None:
                    if args.remeasure:
                        results[experiment][arm][key] = {**measure_run(workdir, judge, bench), "seconds": done["seconds"]}
                        results_path.write_text(json.dumps(results, indent=1))
                    continue
                print(f"[experiments] {experiment} / {arm} / seed {seed}", flush=True)
                seconds = run_arm(workdir, text.replace("{algorithms}", str(algorithms)), seed, zoo, out / "runs" / f"{slug}-s{seed}.log",
                                  LAUNCH_ARGS.get(experiment, []))
                run = measure_run(workdir, judge, bench)
                run["seconds"] = seconds
                results.setdefault(experiment, {}).setdefault(arm, {})[key] = run
                results_path.write_text(json.dumps(results, indent=1))
                last = run["generations"][-1]
                print(f"  {seconds:.0f}s: held-out team coverage {100 * run['generations'][0]['bench_team_coverage']:.1f} -> "
                      f"{100 * last['bench_team_coverage']:.1f}, own-pool coverage {100 * last['own_coverage']:.1f}", flush=True)
    summary = summarise({e: results[e] for e in args.only if e in results}, out)
    (out / "summary.md").write_text(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()
