"""coevo's sandbox: generated code (merge programs, task checkers) runs only in here.

- `sandbox.jobs`: what a runner runs and answers (`MergeJob`, `CheckJob`, results, verdicts,
  the `Runner` protocol);
- `sandbox.policy`: the static policy checked before anything runs;
- `sandbox.runners`: `make_runner` / `runner_from_config` pick a runner; `run_many`;
- `sandbox.docker_runner` (+ `docker_pool`): hardened containers with a warm pool;
- `sandbox.process_runner`: the fallback without Docker (bubblewrap / unshare + rlimits);
- in the sandbox: `sandbox.harness` (merge jobs), `sandbox.checker` (checker jobs),
  `sandbox.restricted` (RestrictedPython and its guards), `sandbox.pool_worker`;
- `sandbox.image`: the sandbox image; `sandbox.config`: `[sandbox]` settings; `sandbox.cli`.

The package itself imports nothing: the container runs only its in-sandbox modules.
"""
