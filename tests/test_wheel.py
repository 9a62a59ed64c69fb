"""A wheel install works outside the source tree: the prompt templates, the archive's schema,
the sandbox image's Dockerfile and the web app's templates and static files ship inside it, so
`coevo prompts list`, the migrations, the image's build context and `coevo serve` work."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from archive_store import SCHEMA_VERSION

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_prompts_and_the_image_context(tmp_path: Path) -> None:
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", ".*_cache", "coevo_work"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    (wheel,) = (tmp_path / "dist").glob("coevo-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # The dependencies come from this environment's site-packages (a path entry, not a site
    # dir, so this environment's editable install of coevo is not seen); coevo from the wheel.
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*args: str) -> str:
        done = subprocess.run([*args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    where = run(str(python), "-c", "import agents, sandbox; print(agents.__file__); print(sandbox.__file__)")
    assert str(ROOT) not in where and str(venv) in where  # the installed copy, not the checkout
    assert run(str(python), "-c", "from archive_store.db import migrations; print(len(migrations()))").strip() == str(SCHEMA_VERSION)
    listed = run(str(venv / "bin" / "coevo"), "prompts", "list")
    names = {line.split()[0] for line in listed.splitlines()}
    assert {"generator", "judge", "gibberish", "best_of_n", "task_writer", "task_novelty"} <= names
    assert str(venv) in run(str(venv / "bin" / "coevo"), "prompts", "path")
    # The web app's templates and its own copy of htmx (no CDN) ship too.
    run(str(python), "-c", "from coevo.web.render import environment; from coevo.web.app import STATIC; "
        "environment().get_template('session.html'); assert (STATIC / 'htmx.min.js').stat().st_size > 10000")
    context = tmp_path / "context"
    context.mkdir()
    run(str(python), "-c", "import sys; from pathlib import Path; from sandbox.image import requirements, "
        "write_context; write_context(Path(sys.argv[1]), requirements())", str(context))
    assert (context / "Dockerfile").read_text() == (ROOT / "sandbox" / "Dockerfile").read_text()
    for module in ("sandbox/harness.py", "sandbox/pool_worker.py", "sandbox/restricted.py", "merging/apply.py"):
        assert (context / "src" / module).is_file(), module
    assert "torch==" in (context / "requirements.txt").read_text()
