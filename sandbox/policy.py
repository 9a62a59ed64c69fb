"""Static policy for generated programs (merge programs and task checkers), checked before
anything executes.

The policy is a cheap first filter with clear verdicts, not the security boundary: the
harness re-checks it, runs the program under RestrictedPython with runtime guards, and the
runner confines the process (rlimits, no network, wall-clock kill). Each rejection names one
rule id so the archive can count rejections by cause:

- `size`: source over `max_bytes`;
- `syntax`: does not parse;
- `import`: imports a module outside `ALLOWED_MODULES` (functools, operator, gc, importlib
  and pickle in particular can bypass RestrictedPython's guards);
- `dunder`: a name or attribute starting with `__` (`().__class__`, `__builtins__`);
- `private`: any other name or attribute starting with `_` (`torch._C`);
- `computed_attr`: an attribute looked up from a runtime string (`getattr(x, 'a' + 'b')`,
  `str.format` fields);
- `banned_name`: a builtin that executes code, does I/O or introspects (`exec`, `open`, ...);
- `banned_attr`: an attribute that leaves the tensor world or writes around its version
  counter (`torch.load`, `torch.utils`, `x.numpy`, `x.data`, generator frames, ...);
- `statement`: `global`, `nonlocal`, classes, async code, generator functions;
- `contract`: no top-level merge function with the signature of `merging.contract`, or
  top-level code other than imports, function definitions, constant assignments and docstrings;
- `restricted_python`: `RestrictedPython.compile_restricted` refuses the source.

Task checkers (`check_checker`) follow the same rules with their own `ProgramPolicy`: the
contract is a top-level `def check(answer, instance)`, the modules are `CHECKER_ALLOWED_MODULES`
(text processing only: nothing that reaches files, processes, the network or introspection), and
`string.Formatter` counts as a `computed_attr` (it looks attributes up from format strings).
"""

from __future__ import annotations

import ast
import hashlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from RestrictedPython import compile_restricted

from merging import contract as merge_contract

ALLOWED_MODULES = frozenset(
    (
        "torch torch.nn torch.nn.functional torch.linalg torch.fft torch.special math itertools"
    ).split()
)

BANNED_NAMES = frozenset(
    (
        "exec eval compile open globals locals vars getattr setattr delattr hasattr "
        "__import__ input breakpoint exit quit help dir memoryview type object super "
        "classmethod staticmethod property license credits copyright"
    ).split()
)

# Top-level torch attributes that reach files, compiled code, devices or global state.
TORCH_BANNED_ATTRS = frozenset(
    (
        "load save hub ops classes utils jit compile cuda from_file backends library "
        "distributed multiprocessing serialization package fx export onnx profiler autograd "
        "testing overrides storage futures monitor mps xpu mtia cpu func compiler dynamo "
        "inductor accelerator sparse nested quantization ao random amp"
    ).split()
)
TORCH_BANNED_PREFIXES = ("set_",)
TORCH_BANNED_SUFFIXES = ("Storage",)

# Attributes banned on any object: file and foreign-array escapes, writes into a tensor that
# its version counter does not see (`.data`, `apply_`, `map_`, `map2_`: the merge engine's
# input check reads that counter instead of copying every input), and frame / code
# introspection (RestrictedPython blocks most of the latter too; kept here for a clear verdict).
BANNED_ATTRS = frozenset(
    (
        "load save numpy tofile dump dumps from_file storage untyped_storage data apply_ map_ "
        "map2_ format "
        "format_map mro tb_frame tb_next f_back f_builtins f_code f_generator f_globals "
        "f_locals f_trace co_code gi_frame gi_code gi_yieldfrom cr_await cr_frame cr_code "
        "cr_origin ag_await ag_frame ag_code func_globals func_code"
    ).split()
)

_ATTR_BUILTINS = frozenset({"getattr", "setattr", "delattr", "hasattr"})
# Attributes that look other attributes up from a runtime string (`'{0.__class__}'.format(x)`).
_FORMAT_ATTRS = frozenset({"format", "format_map"})

# Task checkers: text processing only.
CHECKER_ALLOWED_MODULES = frozenset(
    "re math string json itertools collections difflib unicodedata".split()
)
# `json.dumps` is a pure function in a checker's world (no files are reachable); everything else
# banned for merge programs stays banned (`json.load` / `json.dump` take file objects).
# The tensor-write attributes concern merge programs only.
CHECKER_BANNED_ATTRS = BANNED_ATTRS - {"dumps", "data", "apply_", "map_", "map2_"}
# `string.Formatter().vformat / get_field` resolve `{0.attr}` fields like `str.format` does.
_CHECKER_FORMAT_ATTRS = _FORMAT_ATTRS | {"Formatter", "vformat", "get_field"}
_CHECKER_CONTRACT = "def check(answer, instance)"


@dataclass(frozen=True)
class PolicyVerdict:
    """The outcome of `check_program`: `ok`, or the first rule violated and why."""

    ok: bool
    rule: str | None
    reason: str


@dataclass(frozen=True)
class Contract:
    """The top-level function a program must define: its name and parameter shape.

    Positional parameter names are free (callers pass them positionally); keyword-only names
    are fixed; `*args` / `**kwargs` are not allowed.
    """

    function: str
    positional: int
    keyword_only: frozenset[str]
    signature: str  # as written in reasons, e.g. "def merge(task_vectors, *, name, base)"


@dataclass(frozen=True)
class ProgramPolicy:
    """What one kind of generated program may contain; the AST rules are shared by all kinds."""

    kind: str  # "merge program", "checker": for messages, e.g. the runtime guards'
    contract: Contract
    allowed_modules: frozenset[str]
    banned_names: frozenset[str]
    banned_attrs: frozenset[str]
    format_attrs: frozenset[str]  # attributes rejected as `computed_attr`
    # Whether `from <module> import <name>` is banned (the module itself being allowed).
    from_import_banned: Callable[[str, str], bool]


def _merge_from_import_banned(module: str, name: str) -> bool:
    return module == "torch" and torch_attr_banned(name)


def _checker_from_import_banned(module: str, name: str) -> bool:
    return name in CHECKER_BANNED_ATTRS or name in _CHECKER_FORMAT_ATTRS


MERGE_POLICY = ProgramPolicy(
    kind="merge program",
    contract=Contract(
        function=merge_contract.FUNCTION,
        positional=len(merge_contract.POSITIONAL),
        keyword_only=frozenset(merge_contract.KEYWORD_ONLY),
        signature=merge_contract.SIGNATURE,
    ),
    allowed_modules=ALLOWED_MODULES,
    banned_names=BANNED_NAMES,
    banned_attrs=BANNED_ATTRS,
    format_attrs=_FORMAT_ATTRS,
    from_import_banned=_merge_from_import_banned,
)

CHECKER_POLICY = ProgramPolicy(
    kind="checker",
    contract=Contract(
        function="check",
        positional=2,
        keyword_only=frozenset(),
        signature=_CHECKER_CONTRACT,
    ),
    allowed_modules=CHECKER_ALLOWED_MODULES,
    banned_names=BANNED_NAMES,
    banned_attrs=CHECKER_BANNED_ATTRS,
    format_attrs=_CHECKER_FORMAT_ATTRS,
    from_import_banned=_checker_from_import_banned,
)


def check_program(source: str, *, max_bytes: int = 16_000) -> PolicyVerdict:
    """Check a generated merge program against every policy rule, cheapest first."""
    return check_source(source, MERGE_POLICY, max_bytes=max_bytes)


def check_checker(source: str, *, max_bytes: int = 16_000) -> PolicyVerdict:
    """Check a generated task checker (`def check(answer, instance)`) against every rule."""
    return check_source(source, CHECKER_POLICY, max_bytes=max_bytes)


def check_source(source: str, policy: ProgramPolicy, *, max_bytes: int = 16_000) -> PolicyVerdict:
    """Check `source` against every rule of `policy`, cheapest first."""
    size = len(source.encode("utf-8", errors="surrogatepass"))
    if size > max_bytes:
        return _reject("size", f"source is {size} bytes, limit is {max_bytes}")
    try:
        tree = ast.parse(source, filename="<program>")
    except (SyntaxError, ValueError) as err:
        line = getattr(err, "lineno", None)
        where = f" (line {line})" if line else ""
        return _reject("syntax", f"does not parse: {getattr(err, 'msg', err)}{where}")
    for rule, check in _RULES:
        problem = check(tree, policy)
        if problem is not None:
            return _reject(rule, problem)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            compile_restricted(source, "<program>", "exec")
    except SyntaxError as err:
        return _reject("restricted_python", str(err).replace("\n", "; ")[:500])
    return PolicyVerdict(ok=True, rule=None, reason="ok")


def normalise(source: str) -> str:
    """The program as `ast.unparse` writes it, without comments and docstrings.

    Two programs that differ only in formatting, comments or docstrings normalise to the same
    text. Source that does not parse is returned with trailing whitespace stripped.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return "\n".join(line.rstrip() for line in source.strip().splitlines())
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            body = node.body
            if body and _is_docstring(body[0]):
                body = body[1:] or [ast.Pass()]
            node.body = body
    return ast.unparse(tree)


def code_hash(source: str) -> str:
    """First 16 hex digits of the sha256 of `normalise(source)`: the dedupe key."""
    return hashlib.sha256(normalise(source).encode()).hexdigest()[:16]


def _reject(rule: str, reason: str) -> PolicyVerdict:
    return PolicyVerdict(ok=False, rule=rule, reason=reason)


def _is_docstring(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def _where(node: ast.AST) -> str:
    line = getattr(node, "lineno", None)
    return f" (line {line})" if line else ""


def _identifiers(tree: ast.AST) -> Iterator[tuple[str, ast.AST]]:
    """Every identifier the program names: variables, attributes, arguments, definitions."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.id, node
        elif isinstance(node, ast.Attribute):
            yield node.attr, node
        elif isinstance(node, ast.arg):
            yield node.arg, node
        elif isinstance(node, ast.keyword) and node.arg is not None:
            yield node.arg, node
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield node.name, node
        elif isinstance(node, ast.alias):
            yield node.asname or node.name, node
        elif isinstance(node, ast.ExceptHandler) and node.name:
            yield node.name, node
        elif isinstance(node, ast.Global | ast.Nonlocal):
            for name in node.names:
                yield name, node


def _check_imports(tree: ast.AST, policy: ProgramPolicy) -> str | None:
    allowed = policy.allowed_modules
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name not in allowed:
                    return f"import of '{alias.name}' is not allowed{_where(node)}"
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level or module not in allowed:
                return f"import from '{'.' * node.level}{module}' is not allowed{_where(node)}"
            for alias in node.names:
                full = f"{module}.{alias.name}"
                if alias.name == "*":
                    return f"'from {module} import *' is not allowed{_where(node)}"
                if full in allowed:
                    continue
                if policy.from_import_banned(module, alias.name):
                    return f"'from {module} import {alias.name}' is not allowed{_where(node)}"
    return None


def _check_dunder(tree: ast.AST, policy: ProgramPolicy) -> str | None:
    for name, node in _identifiers(tree):
        if name.startswith("__"):
            return f"name '{name}' starts with '__'{_where(node)}"
    return None


def _check_private(tree: ast.AST, policy: ProgramPolicy) -> str | None:
    for name, node in _identifiers(tree):
        if name.startswith("_") and name != "_":
            return f"name '{name}' starts with '_'{_where(node)}"
    return None


def _check_computed_attr(tree: ast.AST, policy: ProgramPolicy) -> str | None:
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _ATTR_BUILTINS
            and not (len(node.args) >= 2 and isinstance(node.args[1], ast.Constant))
        ):
            return f"{node.func.id}() with a computed attribute name{_where(node)}"
        if isinstance(node, ast.Attribute) and node.attr in policy.format_attrs:
            return f"'.{node.attr}' can look up attributes from a string{_where(node)}"
    return None


def _check_banned_names(tree: ast.AST, policy: ProgramPolicy) -> str | None:
    for name, node in _identifiers(tree):
        if name in policy.banned_names and not isinstance(node, ast.Attribute | ast.keyword):
            return f"name '{name}' is not allowed{_where(node)}"
    return None


def torch_attr_banned(attr: str) -> bool:
    """Whether `torch.<attr>` leaves the tensor world (files, compiled code, devices, state)."""
    return (
        attr in TORCH_BANNED_ATTRS
        or attr.startswith(TORCH_BANNED_PREFIXES)
        or attr.endswith(TORCH_BANNED_SUFFIXES)
    )


def _torch_aliases(tree: ast.AST) -> set[str]:
    aliases: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "torch" or (
                    alias.asname is None and alias.name.startswith("torch.")
                ):
                    aliases.add(alias.asname or "torch")
    return aliases


def _module_aliases(tree: ast.AST, allowed: frozenset[str]) -> set[str]:
    aliases: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            aliases.update(
                alias.asname or alias.name
                for alias in node.names
                if f"{module}.{alias.name}" in allowed
            )
    return aliases


def _check_banned_attrs(tree: ast.AST, policy: ProgramPolicy) -> str | None:
    torch_names = _torch_aliases(tree)
    # A module used as a plain value (`t = torch`, `f(torch)`) would hide later attribute
    # accesses from this check; the harness guards them at runtime too, but reject early.
    modules = _module_aliases(tree, policy.allowed_modules)
    attribute_bases = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in modules and id(node) not in attribute_bases:
            return f"module '{node.id}' may only be used as '{node.id}.<attribute>'{_where(node)}"
        if not isinstance(node, ast.Attribute):
            continue
        if (
            isinstance(node.value, ast.Name)
            and node.value.id in torch_names
            and torch_attr_banned(node.attr)
        ):
            return f"'{node.value.id}.{node.attr}' is not allowed{_where(node)}"
        if node.attr in policy.banned_attrs:
            return f"attribute '.{node.attr}' is not allowed{_where(node)}"
    return None


def _check_statements(tree: ast.AST, policy: ProgramPolicy) -> str | None:
    banned: dict[type[ast.AST], str] = {
        ast.Global: "'global'",
        ast.Nonlocal: "'nonlocal'",
        ast.ClassDef: "class definitions",
        ast.AsyncFunctionDef: "async functions",
        ast.Await: "'await'",
        ast.AsyncFor: "'async for'",
        ast.AsyncWith: "'async with'",
        ast.Yield: "generator functions ('yield')",
        ast.YieldFrom: "generator functions ('yield from')",
    }
    for node in ast.walk(tree):
        what = banned.get(type(node))
        if what is not None:
            return f"{what} not allowed{_where(node)}"
    return None


def _check_contract(tree: ast.AST, policy: ProgramPolicy) -> str | None:
    assert isinstance(tree, ast.Module)
    contract = policy.contract
    defs = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            if node.name == contract.function:
                defs.append(node)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.Import | ast.ImportFrom):
            continue
        elif not _is_docstring(node):
            return (
                f"top-level {type(node).__name__} statement{_where(node)}: only imports, "
                "functions, constants and docstrings may be top-level"
            )
    if not defs:
        return f"no top-level '{contract.signature}'"
    if len(defs) > 1:
        return f"'{contract.function}' is defined {len(defs)} times"
    args = defs[0].args
    positional = args.posonlyargs + args.args
    keyword_only = frozenset(a.arg for a in args.kwonlyargs)
    if (
        len(positional) != contract.positional
        or keyword_only != contract.keyword_only
        or args.vararg is not None
        or args.kwarg is not None
    ):
        return f"{contract.function} must be '{contract.signature}'{_where(defs[0])}"
    return None


_RULES: list[tuple[str, Callable[[ast.AST, ProgramPolicy], str | None]]] = [
    ("import", _check_imports),
    ("dunder", _check_dunder),
    ("private", _check_private),
    ("computed_attr", _check_computed_attr),
    ("banned_name", _check_banned_names),
    ("banned_attr", _check_banned_attrs),
    ("statement", _check_statements),
    ("contract", _check_contract),
]
