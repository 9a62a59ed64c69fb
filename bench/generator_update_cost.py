"""What one generator update costs on the served path: LoRA DPO, then a hot-load into the
running vLLM server, against restarting the server on a full model copy.

A real vLLM OpenAI server (`python -m vllm.entrypoints.openai.api_server`, LoRA on, runtime
loading allowed) serves the zoo's generator (seed 0). `--updates` times: `train_dpo` trains the
current LoRA adapter further on preference pairs between seed-grammar programs (the zoo's
generator corpus, scored at random), saves only the adapter, and coevo's OpenAI backend
hot-loads it (`/v1/load_lora_adapter`). Also: sampling one iteration's programs from the
served base and from an adapter (LoRA's cost at sampling), the adapter's size against the
model's, and the server's start time (what serving each version as a full model would cost
per update, on top of writing that model).

Needs vLLM (on CPU machines: the .venv-vllm of README's Development section):

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python bench/generator_update_cost.py [--updates 3] [--programs 64]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from vllm_server import VLLMServer, free_port  # noqa: E402

from agents.backends import Adapter, OpenAIBackend  # noqa: E402
from agents.config import DPOConfig  # noqa: E402
from agents.dpo import make_preference_pairs, train_dpo  # noqa: E402
from agents.generator import FENCE, completion_text  # noqa: E402
from agents.prompts import load_prompt  # noqa: E402
from coevo.zoo.build import default_zoo_dir, ensure_zoo  # noqa: E402
from coevo.zoo.programs import random_program  # noqa: E402


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--programs", type=int, default=64, help="programs sampled per iteration")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    zoo = ensure_zoo(default_zoo_dir(0), seed=0)
    weights = zoo / "generator"
    prompt = load_prompt("generator", None).render(n_experts=3, exemplars="(none yet)")
    settings = DPOConfig(lora_rank=args.lora_rank, learning_rate=2e-3, epochs=2)
    rng = random.Random(args.seed)
    sample = {"n": args.programs, "temperature": 1.0, "max_new_tokens": 320, "seed": args.seed, "stop": [FENCE]}
    with tempfile.TemporaryDirectory(prefix="coevo-update-cost-") as tmp:
        root = Path(tmp)
        server = VLLMServer(weights, "generator", free_port(), Path(tempfile.gettempdir()) / "coevo-update-cost-server.log",
                            max_lora_rank=args.lora_rank)
        started = time.perf_counter()
        server.start()
        server_start = time.perf_counter() - started
        try:
            client = OpenAIBackend(server.base_url, "generator")
            started = time.perf_counter()
            client.generate([prompt], **sample)
            sample_base = time.perf_counter() - started
            adapter: Path | None = None
            train, load, sample_lora = [], [], []
            for version in range(1, args.updates + 1):
                scored = [{"algorithm_id": f"v{version}p{i}", "prompt": prompt, "score": rng.random(),
                           "completion": completion_text(random_program(rng))} for i in range(args.programs)]
                pairs = make_preference_pairs(scored, top_frac=0.1, bottom_frac=0.25, max_pairs=256)
                out = root / f"v{version}"
                result = train_dpo(weights, pairs, out, settings, seed=version, adapter=adapter)
                train.append(result.duration_s)
                started = time.perf_counter()
                client.use(weights, Adapter(f"bench-v{version}", out))
                load.append(time.perf_counter() - started)
                started = time.perf_counter()
                client.generate([prompt], **sample)
                sample_lora.append(time.perf_counter() - started)
                adapter = out
            assert adapter is not None
            adapter_bytes, model_bytes = _size(adapter), _size(weights)
        finally:
            server.kill()
    ms = statistics.median
    print(f"zoo seed 0 generator ({model_bytes / 1e6:.1f} MB), LoRA rank {args.lora_rank}, {args.updates} updates, "
          f"{args.programs} programs per iteration, {len(pairs)} pairs per update")
    print("| step, per generator update | median |\n| --- | ---: |")
    print(f"| LoRA DPO (train_dpo, adapter saved) | {ms(train):.2f} s |")
    print(f"| hot-load the adapter into the server (/v1/load_lora_adapter) | {1000 * ms(load):.0f} ms |")
    print(f"| restart the server on a full model copy instead | {server_start:.1f} s |")
    print(f"| sample {args.programs} programs: served base | {sample_base:.2f} s |")
    print(f"| sample {args.programs} programs: through the adapter | {ms(sample_lora):.2f} s |")
    print(f"\nadapter {adapter_bytes / 1e6:.2f} MB vs model {model_bytes / 1e6:.2f} MB; "
          f"server start / median hot-load: {server_start / ms(load):.0f}x")


if __name__ == "__main__":
    main()
