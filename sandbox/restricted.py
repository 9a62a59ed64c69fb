"""Running generated code under RestrictedPython: the globals it gets, the guards behind them.

Merge programs (`sandbox.harness`) and task checkers (`sandbox.checker`) both run through
`load_function(source, restricted_globals(policy, ...), name, kind)`: limited builtins,
RestrictedPython's hooks, and import / attribute guards built from the program kind's
`ProgramPolicy` (`sandbox.policy`). Printing goes through `BoundedPrint`, which caps what a
process may print. Runs inside the sandbox only.
"""

from __future__ import annotations

import builtins
import operator
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

from RestrictedPython import compile_restricted, safe_builtins
from RestrictedPython.Guards import (
    full_write_guard,
    guarded_iter_unpack_sequence,
    guarded_unpack_sequence,
    safer_getattr_raise,
)

from sandbox.jobs import truncate
from sandbox.policy import MERGE_POLICY, ProgramPolicy

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


def classify(err: BaseException) -> tuple[str, str]:
    """The verdict of an exception the program raised: `memory_exceeded` or `runtime_error`."""
    if isinstance(err, MemoryError) or is_oom(err):
        return "memory_exceeded", describe(err)
    return "runtime_error", describe(err)


def is_oom(err: BaseException) -> bool:
    """Whether `err` is torch saying it could not allocate memory."""
    message = _message(err).lower()
    return isinstance(err, RuntimeError) and any(marker in message for marker in _OOM_MARKERS)


def describe(err: BaseException) -> str:
    """`Type: message` of an exception, on one line, truncated."""
    return truncate(f"{type(err).__name__}: {_message(err)}")


def _message(err: BaseException) -> str:
    """str(err), or a placeholder when even that fails (`ValueError(10 ** 5000)`)."""
    try:
        return str(err)
    except BaseException:  # noqa: BLE001 - the program's object, anything can happen
        return "<message could not be converted to text>"
