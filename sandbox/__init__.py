"""coevo: sandbox. Static policy for generated merge programs, and runners that execute them
confined (`ProcessRunner` now, Docker later) with the harness in `sandbox.harness`."""

from sandbox.policy import PolicyVerdict, check_program, code_hash, normalise
from sandbox.runner import (
    VERDICTS,
    MergeJob,
    ProcessRunner,
    Runner,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    make_runner,
    run_many,
)

__all__ = [
    "VERDICTS",
    "MergeJob",
    "PolicyVerdict",
    "ProcessRunner",
    "Runner",
    "SandboxLimits",
    "SandboxResult",
    "SandboxUnavailable",
    "check_program",
    "code_hash",
    "make_runner",
    "normalise",
    "run_many",
]
