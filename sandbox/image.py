"""The sandbox image: `coevo sandbox build [--offline] [--gpu] [--base IMAGE]`.

The image holds Python 3.11, the harness's packages pinned to the versions installed on the
host (torch, numpy, safetensors, RestrictedPython, tqdm) and the `sandbox` and `merging` sources,
nothing else. Its tag is a hash of all of that (`coevo-sandbox:<hash>`), so a runner never
uses an image whose harness differs from the host's code: a changed harness means a new tag,
and `ensure_image` builds it.

- Default: `FROM python:3.11-slim` (or a CUDA PyTorch image with `--gpu`) and packages from
  the registries, as users with registry access expect.
- `--offline`: no registry at all. The base is a Debian bookworm made on the host with
  `debootstrap` and `docker import`ed as `coevo-sandbox-base:bookworm` (kept by the daemon, so
  made once per machine); the wheels are downloaded on the host into a cached wheelhouse and
  installed with `--no-index`; the build runs with `--network none`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

IMAGE_REPO = "coevo-sandbox"
OFFLINE_BASE = "coevo-sandbox-base:bookworm"
DEFAULT_BASE = "python:3.11-slim"
# torch comes with a CUDA base; the pinned torch version picks the matching image.
GPU_BASE_TEMPLATE = "pytorch/pytorch:{torch}-cuda12.8-cudnn9-runtime"
DEBIAN_MIRROR = os.environ.get("COEVO_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# Where CPU torch comes from (PyPI's Linux torch pulls GBs of CUDA wheels). Set it to "" when
# the configured pip indexes already serve a CPU torch (a local mirror, as in CI).
CPU_TORCH_INDEX = os.environ.get("COEVO_TORCH_INDEX", "https://download.pytorch.org/whl/cpu")
# What the harness imports, pinned to the host's versions.
PACKAGES = ("torch", "numpy", "safetensors", "RestrictedPython", "tqdm")
# The modules that run inside the container: the harness, what it imports, and the pool worker.
CONTAINER_MODULES = {
    "sandbox": ("__init__.py", "checker.py", "harness.py", "jobs.py", "policy.py", "pool_worker.py",
                "restricted.py"),
    "merging": ("__init__.py", "apply.py", "check.py", "contract.py", "io.py", "methods.py", "writer.py"),
}
SOURCE_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = Path(__file__).resolve().parent / "Dockerfile"

Log = Callable[[str], None]


class ImageError(RuntimeError):
    """The sandbox image cannot be built or found; the message says what to do."""


def requirements(gpu: bool = False) -> list[str]:
    """`name==version` for each package the harness needs, as installed on the host.

    Local version labels (`2.13.0+cpu`) are dropped. Under `gpu` torch is left out: the CUDA
    base image provides it.
    """
    pins = []
    for name in PACKAGES:
        if gpu and name == "torch":
            continue
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError as err:
            raise ImageError(f"package {name} is not installed on the host: {err}") from err
        pins.append(f"{name}=={version.split('+')[0]}")
    return pins


def source_files() -> list[Path]:
    """The Python sources copied into the image (relative to SOURCE_ROOT): `merging` and the
    in-container part of `sandbox`, not the host-side runners, image, config and CLI."""
    return sorted(Path(package) / name for package, names in CONTAINER_MODULES.items() for name in names)


def image_tag(gpu: bool = False) -> str:
    """`coevo-sandbox:<hash>` of the Dockerfile, the pinned requirements and the sources."""
    digest = hashlib.sha256()
    digest.update(DOCKERFILE.read_bytes())
    digest.update("\n".join(requirements(gpu)).encode())
    for path in source_files():
        digest.update(str(path).encode())
        digest.update((SOURCE_ROOT / path).read_bytes())
    return f"{IMAGE_REPO}:{digest.hexdigest()[:12]}{'-gpu' if gpu else ''}"


def image_exists(client: Any, tag: str) -> bool:
    """Whether the daemon has `tag`."""
    import docker.errors

    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def ensure_image(client: Any, *, gpu: bool = False, log: Log = print) -> str:
    """The current image's tag, building it first (from the registries) when it is missing."""
    tag = image_tag(gpu)
    if image_exists(client, tag):
        return tag
    # A machine that built offline before (the debootstrap base is there) builds offline again.
    offline = not gpu and image_exists(client, OFFLINE_BASE)
    log(
        f"sandbox image {tag} not found: building it{' offline' if offline else ''} "
        "(once per coevo version; a few minutes)"
    )
    return build_image(client, gpu=gpu, offline=offline, log=log)


def build_image(
    client: Any,
    *,
    offline: bool = False,
    gpu: bool = False,
    base: str | None = None,
    log: Log = print,
) -> str:
    """Build the sandbox image and return its tag (also tagged `coevo-sandbox:latest`)."""
    import docker.errors

    if offline and gpu and base is None:
        raise ImageError("--offline --gpu needs --base: a local image with CUDA torch for Python 3.11")
    tag = image_tag(gpu)
    reqs = requirements(gpu)
    buildargs: dict[str, str] = {}
    if offline:
        base = base or ensure_offline_base(client, log=log)
    elif base is None:
        base = GPU_BASE_TEMPLATE.format(torch=_torch_version()) if gpu else DEFAULT_BASE
    buildargs["BASE"] = base
    with tempfile.TemporaryDirectory(prefix="coevo-image-") as tmp:
        context = Path(tmp)
        if offline:
            write_context(context, reqs, download_wheelhouse(reqs, log=log))
            buildargs["PIP_ARGS"] = "--no-index --find-links /build/wheels"
        else:
            write_context(context, reqs)
            if not gpu and CPU_TORCH_INDEX:
                buildargs["PIP_ARGS"] = f"--extra-index-url {CPU_TORCH_INDEX}"
        log(f"building {tag} from {base}{' (offline, --network none)' if offline else ''}")
        try:
            stream = client.api.build(
                path=str(context),
                tag=tag,
                buildargs=buildargs,
                network_mode="none" if offline else None,
                rm=True,
                forcerm=True,
                pull=False,
                decode=True,
            )
            for chunk in stream:
                if "error" in chunk:
                    hint = "" if offline else " (no registry access? `coevo sandbox build --offline`)"
                    raise ImageError(f"docker build failed: {str(chunk['error']).strip()}{hint}")
                line = str(chunk.get("stream", "")).strip()
                if line.startswith("Step "):
                    log(f"  {line}")
        except docker.errors.APIError as err:
            raise ImageError(f"docker build failed: {err.explanation or err}") from err
    client.images.get(tag).tag(IMAGE_REPO, "latest-gpu" if gpu else "latest")
    log(f"built {tag}")
    return tag


def write_context(context: Path, reqs: list[str], wheelhouse: Path | None = None) -> None:
    """Fill the build context dir: the Dockerfile, `requirements.txt`, the wheels (offline
    builds) and the in-container sources under `src/`."""
    shutil.copy(DOCKERFILE, context / "Dockerfile")
    (context / "wheels").mkdir()
    (context / "wheels" / ".keep").touch()
    for wheel in wheelhouse.glob("*.whl") if wheelhouse else ():
        _link_or_copy(wheel, context / "wheels" / wheel.name)
    (context / "requirements.txt").write_text("\n".join(reqs) + "\n")
    for path in source_files():
        target = context / "src" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SOURCE_ROOT / path, target)


def ensure_offline_base(client: Any, *, log: Log = print) -> str:
    """`coevo-sandbox-base:bookworm`, made with debootstrap and imported if the daemon lacks it."""
    if image_exists(client, OFFLINE_BASE):
        return OFFLINE_BASE
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise ImageError("--offline needs debootstrap on the host (apt-get install debootstrap)")
    if os.geteuid() != 0:
        raise ImageError("--offline needs root to run debootstrap (run the build with sudo)")
    with tempfile.TemporaryDirectory(prefix="coevo-rootfs-") as tmp:
        root = Path(tmp) / "root"
        log(f"debootstrap bookworm (python3) from {DEBIAN_MIRROR} (about a minute)")
        done = subprocess.run(
            [
                debootstrap,
                "--variant=minbase",
                "--include=python3,python3-venv",
                "bookworm",
                str(root),
                DEBIAN_MIRROR,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            tail = " | ".join(done.stdout.strip().splitlines()[-3:] + done.stderr.strip().splitlines()[-3:])
            raise ImageError(f"debootstrap failed (exit {done.returncode}): {tail}")
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(root / leftover, ignore_errors=True)
        archive = Path(tmp) / "rootfs.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(root, arcname=".")
        log(f"importing the base as {OFFLINE_BASE}")
        repository, tag = OFFLINE_BASE.split(":")
        client.api.import_image_from_file(str(archive), repository=repository, tag=tag)
    return OFFLINE_BASE


def download_wheelhouse(reqs: list[str], *, log: Log = print) -> Path:
    """Wheels for `reqs` and their dependencies (Python 3.11, this machine's architecture).

    Cached in `~/.cache/coevo/wheelhouse-<hash>`; pip takes them from the configured indexes.
    """
    key = hashlib.sha256(("\n".join(reqs) + platform.machine()).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "coevo"
    wheelhouse = cache / f"wheelhouse-{key}"
    if (wheelhouse / ".complete").is_file():
        return wheelhouse
    wheelhouse.mkdir(parents=True, exist_ok=True)
    log(f"downloading wheels into {wheelhouse}")
    arch = platform.machine()
    platforms = [f"manylinux_2_{minor}_{arch}" for minor in (36, 34, 28, 17)] + [
        f"manylinux2014_{arch}",
        f"linux_{arch}",
    ]
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--dest",
        str(wheelhouse),
        "--only-binary=:all:",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        *[arg for p in platforms for arg in ("--platform", p)],
        *(["--extra-index-url", CPU_TORCH_INDEX] if CPU_TORCH_INDEX else []),
        *reqs,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise ImageError(f"downloading wheels failed: {tail}")
    (wheelhouse / ".complete").touch()
    return wheelhouse


def _torch_version() -> str:
    return importlib.metadata.version("torch").split("+")[0]


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy(source, target)
