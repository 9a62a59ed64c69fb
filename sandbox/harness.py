"""The code that runs inside a sandbox: `python -m sandbox.harness JOB.json`.

It confines itself with rlimits, re-checks the static policy, executes the program under
RestrictedPython with runtime guards, applies its `merge` to the job's models with
`merging.merge_models`, and writes a result JSON to the job's `result_path`:
`{"verdict": ..., "reason": ..., "peak_memory_mb": ...}`.

Self-contained on purpose (stdlib, torch, safetensors, RestrictedPython, merging and
`sandbox.policy`; no transformers, which is slow to import): a Docker runner runs the same
module in a container with the same job file. The harness, not the runner, applies the
rlimits because `preexec_fn` is unsafe in a multi-threaded parent (`run_many` uses threads)
and a container entrypoint has no parent to set them.

Job JSON keys: `source`, `base_dir`, `expert_dirs`, `out_dir`, `include`, `result_path`,
`limits` (`SandboxLimits` as a dict). A checker job (`"kind": "check"`, see `sandbox.checker`)
has `source`, `cases`, `result_path` and `limits`, and its result adds `scores` and `errors`.
"""

from __future__ import annotations

import builtins
import json
import math
import operator
import os
import resource
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from RestrictedPython import compile_restricted, safe_builtins
from RestrictedPython.Guards import (
    full_write_guard,
    guarded_iter_unpack_sequence,
    guarded_unpack_sequence,
    safer_getattr_raise,
)

from sandbox.policy import MERGE_POLICY, ProgramPolicy, check_program

MAX_REASON_CHARS = 500
MIB = 1024 * 1024

# Builtins beyond RestrictedPython's `safe_builtins` that cannot reach the host. (RestrictedPython
# leaves out sorted / zip / tuple / reversed because they iterate in C past `_getiter_`; the
# only objects a merge program iterates are lists and tensors, so that guard protects nothing.)
EXTRA_BUILTINS: dict[str, Any] = {
    name: getattr(builtins, name)
    for name in (
        "range len sum min max abs sorted enumerate zip float int list tuple dict set "
        "frozenset isinstance reversed any all round pow map filter bool str divmod iter next"
    ).split()
}
# Taken out of safe_builtins: class creation and attribute writes are not part of the contract.
REMOVED_BUILTINS = ("__build_class__", "setattr", "delattr", "_getattr_")

_INPLACE_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "+=": operator.iadd,
    "-=": operator.isub,
    "*=": operator.imul,
    "/=": operator.itruediv,
    "//=": operator.ifloordiv,
    "%=": operator.imod,
    "**=": operator.ipow,
    "@=": operator.imatmul,
    "&=": operator.iand,
    "|=": operator.ior,
    "^=": operator.ixor,
    "<<=": operator.ilshift,
    ">>=": operator.irshift,
}

_OOM_MARKERS = ("can't allocate memory", "defaultcpuallocator", "out of memory")


class _Compute:
    """Seconds spent inside the program's own `merge` calls (the rest is sandbox overhead)."""

    seconds = 0.0


COMPUTE = _Compute()


class ProgramError(Exception):
    """An exception raised by the generated program itself (kept as `__cause__`)."""


def main(argv: list[str]) -> int:
    """Run the job file `argv[0]`; exit 0 once a result file is written, 2 on a bad job file."""
    if len(argv) != 1:
        print("usage: python -m sandbox.harness JOB.json", file=sys.stderr)
        return 2
    execute(json.loads(Path(argv[0]).read_text()))
    return 0


def execute(job: dict[str, Any]) -> None:
    """Confine this process to the job's limits, run the job, write its result file.

    Used by `main` (one process per job) and by `sandbox.pool_worker` (in a child forked
    from a warm worker, with torch already imported).
    """
    result_path = Path(job["result_path"])
    tmp = result_path.with_suffix(".tmp")
    # Opened before the program runs: a program that exhausts file descriptors (or fills the
    # disk quota with nothing else) still gets its verdict written.
    result_file = open(tmp, "w")  # noqa: SIM115 - closed below, after the program ran
    apply_limits(job["limits"])
    BoundedPrint.budget = int(job["limits"]["max_log_bytes"])
    start = time.perf_counter()
    result: dict[str, Any]
    if job.get("kind") == "check":  # task-checker code scoring answers (sandbox.checker)
        from sandbox.checker import run_check_job

        result = run_check_job(job)
        result["compute_s"] = time.perf_counter() - start
    else:
        verdict, reason = run_job(job)
        result = {"verdict": verdict, "reason": _truncate(reason), "compute_s": COMPUTE.seconds}
    result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["duration_s"] = time.perf_counter() - start
    with result_file:
        result_file.write(json.dumps(result))
    os.replace(tmp, result_path)


def apply_limits(limits: dict[str, Any]) -> None:
    """Lower this process's rlimits to the job's limits (never raises an existing lower one).

    RLIMIT_DATA caps private writable memory, which makes torch raise a clean allocation error;
    RLIMIT_AS is not used because torch reserves large virtual ranges it never touches.
    RLIMIT_FSIZE caps every file written (merged shards, logs), with SIGXFSZ ignored so an
    oversized write fails with an OSError instead of killing the process. RLIMIT_CPU is a
    backstop for a runner that dies before its wall-clock kill. RLIMIT_NPROC counts all
    processes of the user and is not enforced for root (of the initial user namespace), so it
    is set only for other users, on top of what the user already runs.
    """
    _lower(resource.RLIMIT_CORE, 0)
    _lower(resource.RLIMIT_DATA, int(limits["memory_mb"]) * MIB)
    _lower(resource.RLIMIT_FSIZE, int(limits["max_output_mb"]) * MIB)
    _lower(resource.RLIMIT_CPU, int(math.ceil(float(limits["timeout_s"]))) * 2 + 10)
    if os.geteuid() != 0 or _in_user_namespace():
        _lower(resource.RLIMIT_NPROC, _user_process_count() + int(limits["max_processes"]))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _lower(limit: int, value: int) -> None:
    for current in resource.getrlimit(limit):
        if current != resource.RLIM_INFINITY:
            value = min(value, current)
    resource.setrlimit(limit, (value, value))


def _in_user_namespace() -> bool:
    # The initial namespace maps all uids 1:1; `unshare -r` maps only the caller's uid to 0.
    try:
        return Path("/proc/self/uid_map").read_text().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def _user_process_count() -> int:
    uid = os.getuid()
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                count += entry.stat().st_uid == uid
            except OSError:
                continue
    return count


def run_job(job: dict[str, Any]) -> tuple[str, str]:
    """Policy, compile, merge: the `(verdict, reason)` of one job."""
    verdict = check_program(job["source"])
    if not verdict.ok:
        return "rejected_by_policy", f"{verdict.rule}: {verdict.reason}"
    try:
        merge = load_program(job["source"])
    except BaseException as err:  # the program's top level ran and failed, SystemExit included
        return _classify(err)

    import merging

    def guarded_merge(task_vectors: list[Any], *, name: str, base: Any) -> Any:
        start = time.perf_counter()
        try:
            return merge(task_vectors, name=name, base=base)
        except BaseException as err:  # SystemExit, KeyboardInterrupt too: all are the program's
            raise ProgramError(name) from err
        finally:
            COMPUTE.seconds += time.perf_counter() - start

    try:
        merging.merge_models(
            guarded_merge,
            Path(job["base_dir"]),
            [Path(d) for d in job["expert_dirs"]],
            Path(job["out_dir"]),
            include=job.get("include"),
        )
    except ProgramError as err:
        assert err.__cause__ is not None
        verdict_name, reason = _classify(err.__cause__)
        return verdict_name, f"in merge(name={err.args[0]!r}): {reason}"
    except merging.MergeOutputInvalid as err:
        return "output_invalid", str(err)
    except (merging.IncompatibleModels, merging.ModelDirError) as err:
        return "sandbox_error", f"bad models: {err}"
    except MemoryError:
        return "memory_exceeded", "MemoryError while merging"
    except OSError as err:
        return "sandbox_error", f"writing the merged model failed: {err}"
    except Exception as err:
        if _is_oom(err):
            return "memory_exceeded", _describe(err)
        return "sandbox_error", f"merge engine failed: {_describe(err)}"
    return "ok", "ok"


def load_program(source: str) -> Callable[..., Any]:
    """Execute the program's top level under RestrictedPython and return its `merge`."""
    return load_function(source, restricted_globals(), "merge", "program")


def load_function(
    source: str, namespace: dict[str, Any], function: str, kind: str
) -> Callable[..., Any]:
    """Execute `source`'s top level under RestrictedPython in `namespace`; return `function`."""
    with warnings.catch_warnings():
        # "Prints, but never reads 'printed'": printing to the log is what programs mean.
        warnings.simplefilter("ignore", SyntaxWarning)
        code = compile_restricted(source, f"<{kind}>", "exec")
    exec(code, namespace)
    found = namespace.get(function)
    if not callable(found):
        raise ValueError(f"the {kind} does not define a callable '{function}'")
    return found


def restricted_globals(
    policy: ProgramPolicy = MERGE_POLICY,
    write_guard: Callable[[Any], Any] | None = None,
    module_name: str = "program",
) -> dict[str, Any]:
    """The globals generated code runs with: limited builtins, RestrictedPython's hooks, and
    import / attribute guards for `policy` (merge programs by default)."""
    getattr_guard = make_guarded_getattr(policy)
    program_builtins = {k: v for k, v in safe_builtins.items() if k not in REMOVED_BUILTINS}
    program_builtins.update(EXTRA_BUILTINS)
    program_builtins["__import__"] = make_guarded_import(policy, getattr_guard)
    return {
        "__builtins__": program_builtins,
        "__name__": module_name,
        "_getattr_": getattr_guard,
        "_getitem_": operator.getitem,
        "_getiter_": iter,
        "_write_": write_guard or guarded_write,
        "_inplacevar_": inplacevar,
        "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
        "_unpack_sequence_": guarded_unpack_sequence,
        "_apply_": _apply,
        "_print_": BoundedPrint,
    }


def make_guarded_getattr(policy: ProgramPolicy) -> Callable[..., Any]:
    """`safer_getattr` plus `policy`'s rules: no banned or formatter attributes, only
    allow-listed modules (whether read from or returned), and no banned module members
    (`torch.load`)."""
    banned = policy.banned_attrs | policy.format_attrs
    allowed = policy.allowed_modules
    where = f"in {policy.kind}s"

    def guarded_getattr(obj: Any, name: str, *default: Any) -> Any:
        if name in banned:
            raise AttributeError(f"attribute '{name}' is not allowed {where}")
        if isinstance(obj, ModuleType):
            if obj.__name__ not in allowed:
                raise AttributeError(f"module '{obj.__name__}' is not allowed {where}")
            if policy.from_import_banned(obj.__name__, name):
                raise AttributeError(f"'{obj.__name__}.{name}' is not allowed {where}")
        value = safer_getattr_raise(obj, name, *default)
        if isinstance(value, ModuleType) and value.__name__ not in allowed:
            raise AttributeError(f"module '{value.__name__}' is not allowed {where}")
        return value

    return guarded_getattr


def make_guarded_import(
    policy: ProgramPolicy, guarded_getattr: Callable[..., Any]
) -> Callable[..., ModuleType]:
    """`__import__` for `policy`'s modules only; `from m import x` goes through the guards."""
    allowed = policy.allowed_modules
    where = f"in {policy.kind}s"

    def guarded_import(
        name: str,
        globals: dict[str, Any] | None = None,
        locals: dict[str, Any] | None = None,
        fromlist: tuple[str, ...] | None = (),
        level: int = 0,
    ) -> ModuleType:
        if level != 0 or name not in allowed:
            raise ImportError(f"import of '{name}' is not allowed {where}")
        module = builtins.__import__(name, globals, locals, fromlist or (), level)
        for item in fromlist or ():
            if f"{name}.{item}" not in allowed:
                guarded_getattr(module, item)
        return module

    return guarded_import


def guarded_write(obj: Any) -> Any:
    """RestrictedPython's `full_write_guard`, letting tensors through.

    Item assignment on tensors (`merged[mask] = 0`) is ordinary merge code; a program that
    writes into its inputs is caught afterwards by `merge_models`' input check.
    """
    import torch

    if isinstance(obj, torch.Tensor):
        return obj
    return full_write_guard(obj)


def inplacevar(op: str, target: Any, value: Any) -> Any:
    """`x op= y` for RestrictedPython (`_inplacevar_`)."""
    try:
        return _INPLACE_OPS[op](target, value)
    except KeyError:
        raise SyntaxError(f"in-place operator {op!r} is not supported") from None


def _apply(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return func(*args, **kwargs)


class BoundedPrint:
    """`print` for programs: goes to stdout, at most `budget` bytes per process, then dropped.

    RestrictedPython's own PrintCollector keeps everything in memory; a program printing in a
    loop would grow it without bound.
    """

    budget = 64_000
    _written = 0

    def __init__(self, _getattr_: Any = None) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        """Collect one piece of printed text."""
        self.parts.append(text)

    def __call__(self) -> str:
        return ""

    def _call_print(self, *objects: Any, **kwargs: Any) -> None:
        kwargs.pop("file", None)
        self.parts = []
        print(*objects, **kwargs, file=self)
        text = "".join(self.parts)
        left = BoundedPrint.budget - BoundedPrint._written
        if left > 0:
            sys.stdout.write(text[:left])
            sys.stdout.flush()
        BoundedPrint._written += len(text)


def _classify(err: BaseException) -> tuple[str, str]:
    if isinstance(err, MemoryError) or _is_oom(err):
        return "memory_exceeded", _describe(err)
    return "runtime_error", _describe(err)


def _is_oom(err: BaseException) -> bool:
    message = _message(err).lower()
    return isinstance(err, RuntimeError) and any(marker in message for marker in _OOM_MARKERS)


def _describe(err: BaseException) -> str:
    return _truncate(f"{type(err).__name__}: {_message(err)}")


def _message(err: BaseException) -> str:
    """str(err), or a placeholder when even that fails (`ValueError(10 ** 5000)`)."""
    try:
        return str(err)
    except BaseException:  # noqa: BLE001 - the program's object, anything can happen
        return "<message could not be converted to text>"


def _truncate(text: str, limit: int = MAX_REASON_CHARS) -> str:
    text = " ".join(text.split()) if "\n" in text else text
    return text if len(text) <= limit else text[: limit - 15] + "... [truncated]"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
