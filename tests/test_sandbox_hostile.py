"""The hostile-program suite: merge programs that try to escape, exhaust or fool the sandbox.

Every program runs through each sandbox runner (`make_sandbox`: the process fallback and
Docker) against real tiny models, and must get its exact verdict while leaving the host as it
was: model files, a canary file and the test's tmp dir, the environment and /dev/shm
unchanged, the paths it tries to write absent, no secret in what comes back, no sandbox process
left behind. Many programs are stopped by the static policy (`rejected_by_policy`, with the rule
id asserted); the cases made with `stopped(...)` pass the policy (asserted too) and are dealt
with at run time by the harness's guards, the rlimits, the watchdog or the output checks.

A verdict the suite thinks is wrong is not papered over: it is a strict xfail whose reason
says what was expected.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sandbox.jobs import VERDICTS, MergeJob, Runner, SandboxResult
from sandbox.policy import check_program

# Few distinct limit combinations: each one is a separate warm pool for the Docker runner.
DEFAULT: dict[str, Any] = {"timeout_s": 20, "memory_mb": 1024}
SHORT: dict[str, Any] = {"timeout_s": 3, "memory_mb": 1024}  # programs that should time out
SMALL: dict[str, Any] = {"timeout_s": 20, "memory_mb": 512}  # programs that eat memory
MAX_LOG_BYTES = 64_000  # SandboxLimits' default: the cap on returned stdout / stderr
REASON_MAX = 600

# Placeholders in sources, replaced per test by paths the program must not be able to create.
PWNED = "@PWNED@"  # -> tmp_path / "pwned"
TMP_PWNED = "@TMP_PWNED@"  # -> /tmp/coevo-pwned-<random>
SECRET_VAR = "COEVO_TEST_SECRET"


def merge_program(*body: str, imports: str = "import torch") -> str:
    """A merge program: `imports`, then `def merge(...)` with `body` as its lines."""
    lines = "".join(f"    {line}\n" for line in body)
    return f"{imports}\n\n\ndef merge(task_vectors, *, name, base):\n{lines}"


F_IMPORTS = "import torch\nimport torch.nn.functional as F"


@dataclass(frozen=True)
class Case:
    """One hostile program and the verdict it must get.

    `reason` is a substring of the result's reason (for policy rejections: its `rule:` prefix).
    `runs` says the program passes the static policy, so a run-time mechanism must stop it.
    """

    id: str
    source: str
    verdict: str
    reason: str | None = None
    limits: dict[str, Any] = field(default_factory=lambda: DEFAULT)
    runs: bool = False
    flood: bool = False  # the program prints far more than the log cap
    xfail: str | None = None  # why the verdict it gets is wrong (a strict xfail)


def rejected(case_id: str, rule: str, source: str) -> Case:
    """A program the static policy must reject with `rule`."""
    return Case(case_id, source, "rejected_by_policy", f"{rule}:")


def stopped(
    case_id: str,
    verdict: str,
    reason: str | None,
    source: str,
    limits: dict[str, Any] | None = None,
    **extra: Any,
) -> Case:
    """A program that passes the static policy: what happens at run time decides its verdict."""
    return Case(case_id, source, verdict, reason, limits or DEFAULT, runs=True, **extra)


SPIN_AT_IMPORT = """import torch


def spin():
    while True:
        pass


STATE = spin()


def merge(task_vectors, *, name, base):
    return base * 0
"""

RECURSE = """import torch


def down(n):
    return down(n + 1)


def merge(task_vectors, *, name, base):
    return down(0)
"""

# Each warning has a distinct text (the size), so Python prints every one of them to stderr:
# output around the bounded `print`, which only the runner's log cap can stop.
WARNING_FLOOD = merge_program(
    "target = torch.zeros(1)",
    "i = 0",
    "while True:",
    "    F.mse_loss(torch.zeros(0, 100000 + i), target)",
    "    i += 1",
    imports=F_IMPORTS,
)

# The table, one list per category. fmt: off keeps one case per paragraph.
# fmt: off
NETWORK = [
    rejected("net-socket-connect", "import", merge_program(
        "socket.create_connection(('1.1.1.1', 80)).sendall(b'hi')", "return base * 0",
        imports="import socket\nimport torch",
    )),
    rejected("net-dns-lookup", "import", merge_program(
        "import socket", "socket.gethostbyname('example.com')", "return base * 0",
    )),
    rejected("net-http-urllib", "import", merge_program(
        "urllib.request.urlopen('http://example.com').read()", "return base * 0",
        imports="import torch\nimport urllib.request",
    )),
    rejected("net-http-client", "import", merge_program(
        "HTTPConnection('example.com').request('GET', '/')", "return base * 0",
        imports="import torch\nfrom http.client import HTTPConnection",
    )),
    rejected("net-torch-hub-download", "banned_attr", merge_program(
        "torch.hub.load_state_dict_from_url('http://example.com/w.pt')", "return base * 0",
    )),
    stopped("net-curl-via-torch-os", "runtime_error", "module 'os' is not allowed", merge_program(
        "torch.os.system('curl -s http://example.com > /dev/null')", "return base * 0",
    )),
    stopped("net-import-via-F-importlib", "runtime_error", "module 'importlib' is not allowed",
        merge_program(
            "F.importlib.import_module('socket').create_connection(('1.1.1.1', 80))",
            "return base * 0",
            imports=F_IMPORTS,
        ),
    ),
]

HOST_FILES = [
    rejected("read-etc-passwd", "banned_name", merge_program(
        "print(open('/etc/passwd').read())", "return base * 0",
    )),
    rejected("read-ssh-key-torch-load", "banned_attr", merge_program(
        "return torch.load('/root/.ssh/id_rsa')",
    )),
    rejected("read-proc-environ-from-file", "banned_attr", merge_program(
        "data = torch.from_file('/proc/self/environ', size=4096, dtype=torch.uint8)",
        "print(data)",
        "return base * 0",
    )),
    rejected("read-storage-from-file", "banned_attr", merge_program(
        "print(torch.UntypedStorage.from_file('/etc/shadow', False, 64))", "return base * 0",
    )),
    rejected("read-os-environ", "import", merge_program(
        "print(os.environ['COEVO_TEST_SECRET'])", "return base * 0",
        imports="import os\nimport torch",
    )),
    rejected("read-pathlib-home", "import", merge_program(
        "print((pathlib.Path.home() / '.ssh' / 'id_rsa').read_text())", "return base * 0",
        imports="import pathlib\nimport torch",
    )),
    stopped("read-environ-via-torch-os", "runtime_error", "module 'os' is not allowed",
        merge_program("print(torch.os.environ)", "return base * 0"),
    ),
    stopped("read-passwd-via-torch-builtins", "runtime_error", "module 'builtins' is not allowed",
        merge_program("print(torch.builtins.open('/etc/passwd').read())", "return base * 0"),
    ),
]

WRITE_OUTSIDE = [
    rejected("write-open", "banned_name", merge_program(
        f"open('{PWNED}', 'w').write('pwned')", "return base * 0",
    )),
    rejected("write-torch-save", "banned_attr", merge_program(
        f"torch.save(base, '{TMP_PWNED}')", "return base * 0",
    )),
    rejected("write-numpy-tofile", "banned_attr", merge_program(
        f"base.numpy().tofile('{PWNED}')", "return base * 0",
    )),
    rejected("write-huge-shared-file", "banned_attr", merge_program(
        f"torch.from_file('{TMP_PWNED}', shared=True, size=1 << 34)", "return base * 0",
    )),
    stopped("write-makedirs-via-torch-os", "runtime_error", "module 'os' is not allowed",
        merge_program(f"torch.os.makedirs('{PWNED}')", "return base * 0"),
    ),
    # The only file a program writes is the merged model, cast back to the base dtype: a
    # float64 result does not make the output any bigger (checked in `assert_host_unchanged`).
    stopped("write-inflate-output-float64", "ok", "ok", merge_program(
        "return task_vectors[0].double() * 0",
    )),
]

FORK_BOMBS = [
    rejected("fork-os-fork", "import", merge_program(
        "while True:", "    os.fork()", imports="import os\nimport torch",
    )),
    rejected("fork-subprocess", "import", merge_program(
        "subprocess.Popen(['sh', '-c', ':(){ :|:& };:'])", "return base * 0",
        imports="import subprocess\nimport torch",
    )),
    rejected("fork-multiprocessing", "import", merge_program(
        "multiprocessing.Pool(64).map(len, [[0]] * 64)", "return base * 0",
        imports="import multiprocessing\nimport torch",
    )),
    rejected("fork-torch-multiprocessing", "banned_attr", merge_program(
        "torch.multiprocessing.Process(target=len, args=([],)).start()", "return base * 0",
    )),
    stopped("fork-via-torch-os", "runtime_error", "module 'os' is not allowed", merge_program(
        "while True:", "    torch.os.fork()",
    )),
    stopped("fork-torch-mp-via-F", "runtime_error", "'torch.multiprocessing' is not allowed",
        merge_program("F.torch.multiprocessing.Pool(64)", "return base * 0", imports=F_IMPORTS),
    ),
]

MEMORY_BOMBS = [
    stopped("mem-torch-empty-400gb", "memory_exceeded", None, merge_program(
        "return torch.empty(10**11)",
    ), SMALL),
    stopped("mem-torch-ones-1200mb", "memory_exceeded", None, merge_program(
        "return torch.ones(300_000_000)",
    ), SMALL),
    stopped("mem-tensor-growth", "memory_exceeded", None, merge_program(
        "keep = []", "while True:", "    keep.append(torch.ones(50_000_000))",
    ), SMALL),
    stopped("mem-list-growth", "memory_exceeded", None, merge_program(
        "keep = []", "while True:", "    keep.append([0] * 10**6)",
    ), SMALL),
    stopped("mem-itertools-count", "memory_exceeded", None, merge_program(
        "return list(itertools.count())", imports="import itertools\nimport torch",
    ), SMALL),
    stopped("mem-at-import", "memory_exceeded", None,
        "import torch\n\nBIG = [0] * 10**10\n\n\n"
        "def merge(task_vectors, *, name, base):\n    return base * 0\n",
        SMALL,
    ),
]

CPU_AND_TIME = [
    stopped("cpu-spin", "timeout", "wall-clock", merge_program("while True:", "    pass"), SHORT),
    stopped("cpu-spin-in-native-ops", "timeout", "wall-clock", merge_program(
        "x = torch.zeros(8)", "while True:", "    x = x + 0",
    ), SHORT),
    stopped("cpu-huge-matmul", "timeout", "wall-clock", merge_program(
        "a = torch.randn(4000, 4000)", "for i in range(1000):", "    a = a @ a", "return base * 0",
    ), SHORT),
    # The runner never asks nicely: a program that swallows every exception still dies.
    stopped("cpu-swallow-every-exception", "timeout", "wall-clock", merge_program(
        "while True:",
        "    try:",
        "        while True:",
        "            pass",
        "    except BaseException:",
        "        pass",
    ), SHORT),
    stopped("cpu-spin-at-import", "timeout", "wall-clock", SPIN_AT_IMPORT, SHORT),
    rejected("cpu-spin-top-level-loop", "contract", merge_program("return base * 0")
        + "\nwhile True:\n    pass\n"),
    rejected("sleep-time-sleep", "import", merge_program(
        "time.sleep(3600)", "return base * 0", imports="import time\nimport torch",
    )),
    rejected("sigterm-ignore", "import", merge_program(
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)", "while True:", "    pass",
        imports="import signal\nimport torch",
    )),
]

FLOODS = [
    stopped("flood-stdout-forever", "timeout", "wall-clock", merge_program(
        "while True:", "    print('x' * 1000)",
    ), SHORT, flood=True),
    stopped("flood-stdout-then-ok", "ok", "ok", merge_program(
        "for i in range(100):", "    print('y' * 100_000)", "return base * 0",
    ), flood=True),
    stopped("flood-stderr-warnings", "runtime_error", "bytes of logs", WARNING_FLOOD),
]

INTROSPECTION = [
    rejected("intro-subclasses", "dunder", merge_program(
        "return ().__class__.__bases__[0].__subclasses__()",
    )),
    rejected("intro-generator-frame", "banned_attr", merge_program(
        "frame = (t for t in task_vectors).gi_frame.f_back", "print(frame)", "return base * 0",
    )),
    rejected("intro-traceback-frame", "dunder", merge_program(
        "try:",
        "    1 / 0",
        "except ZeroDivisionError as err:",
        "    print(err.__traceback__.tb_frame.f_back.f_globals)",
        "return base * 0",
    )),
    rejected("intro-gc-get-objects", "import", merge_program(
        "print(gc.get_objects()[:10])", "return base * 0", imports="import gc\nimport torch",
    )),
    rejected("intro-inspect", "import", merge_program(
        "print(inspect.stack())", "return base * 0", imports="import inspect\nimport torch",
    )),
    rejected("intro-builtins-tamper", "dunder", merge_program(
        "__builtins__['len'] = sum", "return base * 0",
    )),
    rejected("intro-globals", "banned_name", merge_program(
        "globals()['merge'] = None", "return base * 0",
    )),
    rejected("intro-type-mro", "banned_name", merge_program(
        "print(type(base).mro())", "return base * 0",
    )),
    rejected("intro-torch-private-C", "private", merge_program(
        "print(torch._C._get_tracing_state())", "return base * 0",
    )),
    rejected("intro-augassign-module-attr", "restricted_python", merge_program(
        "torch.pi += 1", "return base * 0",
    )),
    stopped("intro-inspect-via-torch", "runtime_error", "module 'inspect' is not allowed",
        merge_program("print(torch.inspect.stack())", "return base * 0"),
    ),
    stopped("intro-tamper-torch-function", "runtime_error", "TypeError", merge_program(
        "torch.add = torch.sub", "return base * 0",
    )),
    stopped("intro-tamper-tensor-method", "runtime_error", "TypeError", merge_program(
        "torch.Tensor.clone = torch.Tensor.zero_", "return base * 0",
    )),
    stopped("intro-tamper-math-module", "runtime_error", "TypeError", merge_program(
        "math.pi = 3", "return base * 0", imports="import math\nimport torch",
    )),
]

ESCAPE_TRICKS = [
    rejected("trick-ctypes", "import", merge_program(
        "ctypes.CDLL(None).system(b'id')", "return base * 0", imports="import ctypes\nimport torch",
    )),
    rejected("trick-importlib", "import", merge_program(
        "importlib.import_module('os').system('id')", "return base * 0",
        imports="import importlib\nimport torch",
    )),
    rejected("trick-pickle", "import", merge_program(
        "pickle.loads(b'cos\\nsystem\\n(S\"id\"\\ntR.')", "return base * 0",
        imports="import pickle\nimport torch",
    )),
    rejected("trick-pickle-via-torch-serialization", "banned_attr", merge_program(
        "torch.serialization.pickle.loads(b'')", "return base * 0",
    )),
    rejected("trick-operator-attrgetter", "import", merge_program(
        "return attrgetter('__class__')(base)",
        imports="import torch\nfrom operator import attrgetter",
    )),
    rejected("trick-functools-reduce-getattr", "import", merge_program(
        "return functools.reduce(getattr, ['__class__', '__base__'], base)",
        imports="import functools\nimport torch",
    )),
    rejected("trick-getattr-computed", "computed_attr", merge_program(
        "return getattr(base, '__cla' + 'ss__')",
    )),
    rejected("trick-getattr-constant", "banned_name", merge_program(
        "return getattr(base, '__class__')",
    )),
    rejected("trick-str-format-reach", "computed_attr", merge_program(
        "print('{0.__class__.__init__.__globals__}'.format(merge))", "return base * 0",
    )),
    rejected("trick-str-format-map", "computed_attr", merge_program(
        "print('{t.__class__}'.format_map({'t': base}))", "return base * 0",
    )),
    rejected("trick-eval", "banned_name", merge_program(
        "return eval(\"__import__('os').system('id')\")",
    )),
    rejected("trick-exec", "banned_name", merge_program(
        "exec('import os; os.system(\"id\")')", "return base * 0",
    )),
    rejected("trick-class-definition", "statement",
        "import torch\n\n\nclass Evil:\n    pass\n\n\n" + merge_program("return base * 0"),
    ),
    rejected("trick-generator-function", "statement", merge_program("yield base")),
    rejected("trick-huge-source", "size", merge_program("return base * 0") + "#" * 100_000),
    stopped("trick-ctypes-via-torch", "runtime_error", "module 'ctypes' is not allowed",
        merge_program("torch.ctypes.CDLL(None).system(b'id')", "return base * 0"),
    ),
    stopped("trick-functools-via-torch", "runtime_error", "module 'functools' is not allowed",
        merge_program("print(torch.functools.reduce)", "return base * 0"),
    ),
    stopped("trick-torch-utils-via-F", "runtime_error", "'torch.utils' is not allowed",
        merge_program("print(F.torch.utils.hooks.RemovableHandle)", "return base * 0", imports=F_IMPORTS),
    ),
]

INPUTS_AND_OUTPUTS = [
    stopped("inputs-task-vector-add_", "output_invalid", "modified its inputs", merge_program(
        "task_vectors[0].add_(1)", "return task_vectors[1] * 0",
    )),
    stopped("inputs-base-mul_", "output_invalid", "modified its inputs", merge_program(
        "base.mul_(0)", "return task_vectors[0] * 0",
    )),
    stopped("inputs-base-slice-assign", "output_invalid", "modified its inputs", merge_program(
        "base[:] = 0", "return task_vectors[0] * 0",
    )),
    # Shrinking the base in place makes a tiny result pass the shape check: the input check
    # must still catch it.
    stopped("inputs-base-resize_", "output_invalid", "modified its inputs", merge_program(
        "base.resize_(1)", "return torch.zeros(1)",
    )),
    stopped("out-nan", "output_invalid", "not finite", merge_program(
        "return task_vectors[0] * float('nan')",
    )),
    stopped("out-inf", "output_invalid", "not finite", merge_program(
        "return torch.full_like(base, float('inf'))",
    )),
    stopped("out-wrong-shape", "output_invalid", "shape", merge_program(
        "return base.flatten()",
    )),
    stopped("out-int-dtype", "output_invalid", "not floating point", merge_program(
        "return torch.zeros_like(base, dtype=torch.int64)",
    )),
    stopped("out-complex-dtype", "output_invalid", "not floating point", merge_program(
        "return base.to(torch.complex64)",
    )),
    stopped("out-not-a-tensor", "output_invalid", "not a torch.Tensor", merge_program(
        "return [base]",
    )),
    stopped("out-sparse-layout", "output_invalid", "not a dense tensor", merge_program(
        "return (task_vectors[0] * 0).to_sparse()",
    )),
    stopped("out-meta-device", "output_invalid", "not a dense tensor", merge_program(
        "return torch.empty(base.shape, device='meta')",
    )),
]

EXCEPTIONS = [
    stopped("exc-enormous-message", "runtime_error", "ValueError: xxxx", merge_program(
        "raise ValueError('x' * 10**6)",
    )),
    stopped("exc-multiline-message", "runtime_error", "ValueError: line", merge_program(
        "raise ValueError('line\\n' * 10**5)",
    )),
    stopped("exc-system-exit", "runtime_error", "SystemExit", merge_program(
        "raise SystemExit(0)",
    )),
    stopped("exc-deep-recursion", "runtime_error", "RecursionError", RECURSE),
    stopped("exc-unprintable-message", "runtime_error", "ValueError", merge_program(
        "raise ValueError(10 ** 5000)",
    )),
]

# fmt: on

CASES = (
    NETWORK
    + HOST_FILES
    + WRITE_OUTSIDE
    + FORK_BOMBS
    + MEMORY_BOMBS
    + CPU_AND_TIME
    + FLOODS
    + INTROSPECTION
    + ESCAPE_TRICKS
    + INPUTS_AND_OUTPUTS
    + EXCEPTIONS
)


def _params(cases: list[Case]) -> list[Any]:
    return [
        pytest.param(
            case,
            id=case.id,
            marks=[pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else [],
        )
        for case in cases
    ]


# --- host-unchanged checks ----------------------------------------------------------------


def _sha256_tree(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _listing(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def _environ() -> dict[str, str]:
    # pytest rewrites PYTEST_CURRENT_TEST between the setup and call phases.
    return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}


def _dev_shm() -> set[str]:
    try:
        return {name for name in os.listdir("/dev/shm") if name.startswith("torch_")}
    except OSError:
        return set()


def sandbox_descendants() -> list[str]:
    """Processes descended from this test process whose command line is a sandbox's."""
    parent: dict[int, int] = {}
    command: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/stat") as stat:
                parent[pid] = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                command[pid] = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
    me = os.getpid()
    found = []
    for pid, cmd in command.items():
        if "sandbox.harness" not in cmd and "sandbox.pool_worker" not in cmd:
            continue
        ancestor, seen = parent.get(pid, 0), set()
        while ancestor > 1 and ancestor not in seen:
            if ancestor == me:
                found.append(f"{pid}: {cmd[:200]}")
                break
            seen.add(ancestor)
            ancestor = parent.get(ancestor, 0)
    return found


@dataclass
class Host:
    """What a sandboxed program must not change, recorded before it runs."""

    tiny_models: dict[str, Any]
    tmp_path: Path
    out_dir: Path
    secret: str
    paths: dict[str, str]
    models: dict[str, dict[str, str]] = field(default_factory=dict)
    canary: bytes = b""
    listing: set[str] = field(default_factory=set)
    environ: dict[str, str] = field(default_factory=dict)
    shm: set[str] = field(default_factory=set)

    @classmethod
    def record(cls, tiny_models: dict[str, Any], tmp_path: Path, secret: str) -> Host:
        paths = {PWNED: str(tmp_path / "pwned"), TMP_PWNED: f"/tmp/coevo-pwned-{uuid.uuid4().hex}"}
        host = cls(tiny_models, tmp_path, tmp_path / "out", secret, paths)
        host.models = {str(d): _sha256_tree(d) for d in host.model_dirs()}
        host.canary = os.urandom(64)
        (tmp_path / "canary.bin").write_bytes(host.canary)
        host.listing = _listing(tmp_path)
        host.environ = _environ()
        host.shm = _dev_shm()
        assert not any(Path(p).exists() for p in paths.values())
        return host

    def model_dirs(self) -> list[Path]:
        return [Path(self.tiny_models["base"]), *map(Path, self.tiny_models["experts"])]

    def source(self, template: str) -> str:
        for token, path in self.paths.items():
            template = template.replace(token, path)
        return template

    def job(self, source: str) -> MergeJob:
        base, experts = self.tiny_models["base"], list(self.tiny_models["experts"])
        return MergeJob(self.source(source), base, experts, self.out_dir)

    def assert_unchanged(self, result: SandboxResult) -> None:
        """The host is as recorded; the output dir exists exactly when the verdict is ok."""
        for model_dir in self.model_dirs():
            assert _sha256_tree(model_dir) == self.models[str(model_dir)], model_dir
        assert (self.tmp_path / "canary.bin").read_bytes() == self.canary
        new = _listing(self.tmp_path) - self.listing
        if result.verdict == "ok":
            assert (self.out_dir / "config.json").is_file()
            weights = sum(p.stat().st_size for p in self.out_dir.glob("*.safetensors"))
            base = sum(p.stat().st_size for p in self.model_dirs()[0].glob("*.safetensors"))
            assert 0 < weights <= base * 1.05, (weights, base)
            new = {p for p in new if p != "out" and not p.startswith("out/")}
        else:
            assert not self.out_dir.exists()
        assert not new, f"files appeared next to the output: {sorted(new)[:5]}"
        assert _listing(self.tmp_path) >= self.listing  # nothing removed either
        for path in self.paths.values():
            assert not Path(path).exists(), path
        assert _environ() == self.environ
        assert not _dev_shm() - self.shm, "shared-memory files left in /dev/shm"
        assert not sandbox_descendants()
        for text in (result.stdout, result.stderr, result.reason):
            assert self.secret not in text


def assert_sane(result: SandboxResult, limits: dict[str, Any]) -> None:
    """What holds for every result, whatever the program did."""
    assert result.verdict in VERDICTS
    assert "\n" not in result.reason
    assert len(result.reason) <= REASON_MAX
    assert result.duration_s < limits["timeout_s"] + 15, result.duration_s
    # Returned logs are capped (head and tail around a one-line marker when truncated).
    assert len(result.stdout) <= MAX_LOG_BYTES + 100
    assert len(result.stderr) <= MAX_LOG_BYTES + 100


@pytest.fixture
def host(tiny_models: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Host:
    """The host recorded before the program runs, with a secret in the environment."""
    secret = f"coevo-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv(SECRET_VAR, secret)
    return Host.record(tiny_models, tmp_path, secret)


def run_hostile(
    make_sandbox: Callable[..., Runner], host: Host, source: str, limits: dict[str, Any]
) -> SandboxResult:
    """Run `source` in a sandbox with `limits`, check the universal invariants."""
    result = make_sandbox(**limits).run(host.job(source))
    assert_sane(result, limits)
    return result


# --- the table ----------------------------------------------------------------------------


def test_the_suite_is_big_enough() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 30
    assert sum(case.runs for case in CASES) >= 30  # most categories also reach run time
    assert {case.verdict for case in CASES} == set(VERDICTS) - {"sandbox_error"}


@pytest.mark.parametrize("case", _params(CASES))
def test_hostile_program(case: Case, make_sandbox: Callable[..., Runner], host: Host) -> None:
    source = host.source(case.source)
    # Pin down which layer stops the program: the static policy, or something at run time.
    assert check_program(source).ok == case.runs, check_program(source)

    result = run_hostile(make_sandbox, host, source, case.limits)

    assert result.verdict == case.verdict, result
    if case.verdict == "rejected_by_policy":
        assert case.reason is not None and result.reason.startswith(case.reason), result.reason
    elif case.reason is not None:
        assert case.reason in result.reason, result.reason
    if case.flood:
        # Printed far more than the cap: what comes back is cut to it.
        assert MAX_LOG_BYTES // 2 < len(result.stdout) <= MAX_LOG_BYTES + 100
    host.assert_unchanged(result)


# --- cases that need their own set-up or assertions ---------------------------------------

SHARED_MEMORY_BOMB = merge_program(
    "keep = []", "while True:", "    keep.append(torch.zeros(50_000_000).share_memory_())"
)

FD_EXHAUSTION = """import torch

KEEP = []


def merge(task_vectors, *, name, base):
    while True:
        KEEP.append(torch.zeros(1).share_memory_())
"""


def test_shared_memory_bomb_fills_no_host_scratch_space(
    make_sandbox: Callable[..., Runner], host: Host
) -> None:
    """`share_memory_()` is the one way a program creates files (in /dev/shm) and it bypasses
    RLIMIT_DATA: the memory watchdog must stop it, and nothing may be left in the host's
    /dev/shm (a job killed between shm_open and unlink leaks its segment when the sandbox
    shares the host's /dev/shm)."""
    assert check_program(SHARED_MEMORY_BOMB).ok
    result = run_hostile(make_sandbox, host, SHARED_MEMORY_BOMB, SMALL)
    # The process runner's watchdog counts shared memory (memory_exceeded); a Docker container's
    # own /dev/shm is small, so there the program fails when it is full (runtime_error).
    assert result.verdict in ("memory_exceeded", "runtime_error"), result
    host.assert_unchanged(result)


def test_file_descriptor_exhaustion_is_the_programs_fault(
    make_sandbox: Callable[..., Runner],
    host: Host,
    sandbox_kind: str,
    request: pytest.FixtureRequest,
) -> None:
    """Every shared tensor keeps a file descriptor open: a program can run the harness out of
    descriptors before it writes its result. That is a resource the program exhausted."""
    assert check_program(FD_EXHAUSTION).ok
    result = run_hostile(make_sandbox, host, FD_EXHAUSTION, DEFAULT)
    assert result.verdict == "runtime_error", result
    host.assert_unchanged(result)
