"""Tests of the static policy for generated merge programs, and of the harness's runtime guards."""

from __future__ import annotations

import random

import pytest
import torch

from coevo.zoo.programs import random_program
from sandbox.harness import load_program
from sandbox.policy import check_program, code_hash, normalise

HEADER = "import torch\n\n\ndef merge(task_vectors, *, name, base):\n"


def _program(*body: str) -> str:
    return HEADER + "".join(f"    {line}\n" for line in body)


VALID = [
    _program("return torch.stack(task_vectors).mean(dim=0)"),
    _program("return sum(task_vectors) * 0.5"),
    "import math\nimport itertools\nimport torch\nimport torch.nn.functional as F\nfrom torch import nn\n"
    "SCALE = 0.3\n\n"
    "def helper(tv):\n    return tv * SCALE\n\n"
    "def merge(tvs, *, base, name):\n"
    '    """Docstring."""\n'
    "    total = 0\n"
    "    for a, b in itertools.combinations(range(len(tvs)), 2):\n"
    "        total += F.cosine_similarity(tvs[a].flatten(), tvs[b].flatten(), dim=0)\n"
    "    merged = torch.zeros_like(base)\n"
    "    merged[merged == 0] = 1.0\n"
    "    print(name, math.pi)\n"
    "    return sum(helper(tv) for tv in tvs) * float(total) + nn.functional.relu(merged) * 0\n",
]


@pytest.mark.parametrize("source", VALID)
def test_accepts_valid_programs(source: str) -> None:
    verdict = check_program(source)
    assert verdict.ok, verdict
    assert verdict.rule is None


def test_accepts_the_zoo_corpus() -> None:
    rng = random.Random(0)
    for _ in range(200):
        source = random_program(rng)
        assert check_program(source).ok, source


REJECTED = [
    ("dunder", _program("return ().__class__.__bases__")),
    ("dunder", _program("return __builtins__")),
    ("dunder", _program("return __import__('os')")),
    ("private", _program("return torch._C")),
    ("import", "import os\n" + _program("return task_vectors[0]")),
    ("import", "from subprocess import run\n" + _program("return task_vectors[0]")),
    ("import", _program("import socket", "return task_vectors[0]")),
    ("import", "import functools\n" + _program("return task_vectors[0]")),
    ("import", "import torch.utils\n" + _program("return task_vectors[0]")),
    ("import", "from . import x\n" + _program("return task_vectors[0]")),
    ("banned_name", _program("open('/etc/passwd')", "return base")),
    ("banned_name", _program("exec('x = 1')", "return base")),
    ("banned_name", _program("return eval('base')")),
    ("banned_name", _program("return type(base)")),
    ("computed_attr", _program("return getattr(base, 'a' + 'b')")),
    ("computed_attr", _program("return '{0.x}'.format(base)")),
    ("banned_attr", _program("torch.load('/tmp/x.pt')", "return base")),
    ("banned_attr", _program("torch.save(base, '/tmp/x.pt')", "return base")),
    ("banned_attr", _program("torch.set_num_threads(64)", "return base")),
    ("banned_attr", _program("return torch.hub.load('a', 'b')")),
    ("banned_attr", _program("return torch.UntypedStorage.from_file('/etc/passwd')")),
    ("banned_attr", _program("return torch.tensor(base.numpy())")),
    # Writes the version counter does not see (the engine's input check reads that counter).
    ("banned_attr", _program("base.data.mul_(0)", "return base")),
    ("banned_attr", _program("task_vectors[0].apply_(abs)", "return base")),
    ("banned_attr", _program("base.map_(base, max)", "return base")),
    ("import", "from torch import load\n" + _program("return base")),
    ("banned_attr", _program("t = torch", "return t.utils")),
    ("banned_attr", _program("g = (x for x in task_vectors)", "return g.gi_frame")),
    ("statement", _program("global base", "return base")),
    ("statement", "class A:\n    pass\n\n" + _program("return base")),
    ("statement", _program("yield base")),
    ("contract", "import torch\n\n\ndef blend(task_vectors, *, name, base):\n    return base\n"),
    ("contract", "def merge(task_vectors, name, base):\n    return base\n"),
    ("contract", "def merge(task_vectors, *, name, base, alpha):\n    return base\n"),
    ("contract", "def merge(*task_vectors, name, base):\n    return base\n"),
    ("contract", _program("return base") + "\nwhile True:\n    pass\n"),
    ("contract", _program("return base") + _program("return base")),
    ("restricted_python", _program("x = 1", "x.y += 1", "return base")),
    ("syntax", _program("return (")),
    ("size", _program("return base") + "#" * 20_000),
]


@pytest.mark.parametrize(("rule", "source"), REJECTED)
def test_rejects_with_rule(rule: str, source: str) -> None:
    verdict = check_program(source)
    assert not verdict.ok
    assert verdict.rule == rule, verdict
    assert verdict.reason and "\n" not in verdict.reason


def test_size_limit_is_configurable() -> None:
    source = _program("return base")
    assert check_program(source, max_bytes=len(source)).ok
    assert check_program(source, max_bytes=len(source) - 1).rule == "size"


def test_normalise_ignores_comments_docstrings_and_layout() -> None:
    a = _program("return sum(task_vectors)")
    b = (
        "# a comment\nimport torch\ndef merge(task_vectors, *, name, base):\n"
        '    """Sum them."""\n    return sum( task_vectors )  # why\n'
    )
    assert normalise(a) == normalise(b)
    assert code_hash(a) == code_hash(b)
    assert len(code_hash(a)) == 16 and int(code_hash(a), 16) >= 0
    assert code_hash(a) != code_hash(_program("return sum(task_vectors) * 2"))
    assert code_hash("def (") == code_hash("def (   \n")  # unparseable: still hashable


def _run(source: str) -> torch.Tensor:
    tvs = [torch.randn(4, 3) for _ in range(3)]
    result: torch.Tensor = load_program(source)(tvs, name="w", base=torch.zeros(4, 3))
    return result


@pytest.mark.parametrize(
    "body",
    [
        "return torch.os.system('true')",  # a module torch imported, not an allowed one
        "return torch.functional.norm(base)",
        "return torch.nn.functional.importlib",
        "return torch.nn.utils",
    ],
)
def test_runtime_guards_block_what_the_policy_cannot_see(body: str) -> None:
    source = _program(body)
    assert check_program(source).ok  # only the runtime guard stands in the way
    with pytest.raises(AttributeError, match="not allowed"):
        _run(source)


def test_runtime_guards_block_imports_from_banned_modules() -> None:
    with pytest.raises(AttributeError, match="not allowed"):
        load_program("from torch import os\n" + _program("return base"))
    with pytest.raises(ImportError, match="not allowed"):
        load_program("import os\n" + _program("return base"))


def test_restricted_program_runs_ordinary_merge_code() -> None:
    merged = _run(VALID[2])
    assert merged.shape == (4, 3)
    assert torch.isfinite(merged).all()
