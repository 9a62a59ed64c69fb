"""The sandbox's settings (`[sandbox]` in a session config), validated at the edge.

`sandbox.runners.runner_from_config` turns them into a runner; this module only holds data.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sandbox.jobs import available_cpus


class SandboxConfig(BaseModel):
    """Which runner executes generated code, with which limits and pool."""

    model_config = ConfigDict(extra="forbid")

    runner: Literal["auto", "docker", "process"] = Field(
        "auto", description="auto = Docker when a daemon is reachable, else process"
    )
    timeout_s: float = Field(60.0, gt=0)
    memory_mb: int = Field(2048, ge=128)
    workers: int = Field(2, ge=1, description="programs executed in parallel")
    pool_size: int = Field(2, ge=0, description="warm Docker containers; 0 = a cold container per job")
    jobs_per_container: int = Field(50, ge=1, description="a warm container is replaced after this many jobs")
    cpus: float = Field(
        0.0, ge=0, description="CPU quota and torch threads per job; 0 = the machine's cores shared among the workers"
    )
    scratch_mb: int = Field(64, ge=1, description="size of each container's /tmp tmpfs")
    docker_runtime: str = Field("", description="'' = Docker's default; 'runsc' for gVisor")
    gpus: str = Field("", description="'' = none; 'all' or a count: GPUs a job may use (merges run on CUDA)")

    def job_cpus(self) -> float:
        """`cpus`, or with 0 the machine's cores divided among `workers` (at least 1 each)."""
        return self.cpus or float(max(1, available_cpus() // self.workers))

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, value: str) -> str:
        if value not in ("", "all") and not (value.isdigit() and int(value) > 0):
            raise ValueError("must be 'all' or a positive count such as '1'")
        return value
