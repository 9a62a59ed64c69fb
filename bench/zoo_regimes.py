"""Which zoo regime makes merging pay? Train base + experts + multi-task model, merge, measure.

Each preset is one row of BENCHMARKS.md ("Zoo v2: finding the regime"): a model size, a base
pre-training mixture and an expert schedule. Everything is trained in memory with the zoo's own
training loop and skills, and measured on the zoo's test split of the discovery skills: the
base, each expert, a multi-task fine-tune on the three skills, task arithmetic with its scale
tuned on dev (the zoo's grid), TIES, DARE and Model Stock. About 2-4 min per preset on 2 cores.

    python bench/zoo_regimes.py [--presets v1 latent ...] [--seed 0] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import LlamaForCausalLM

from agents.baselines import TA_SCALES
from coevo.zoo import build
from coevo.zoo.skills import DISCOVERY, FILLERS, SKILLS, TRANSFER, base_example, make_tasks
from coevo.zoo.tiny import char_tokenizer, tiny_llama_config
from coevo.zoo.train import encode_pairs, train_lm
from merging.methods import make_merge_fn

Example = tuple[str, str]


def _v1(rng: random.Random) -> Example:
    """Zoo v1: copying, and the narrow slice of the three tested skills."""
    if rng.random() < 0.3:
        return FILLERS[0].example(rng)
    return SKILLS[rng.choice(DISCOVERY)].narrow_example(rng)


def _latent(rng: random.Random) -> Example:
    """The tested skills only in their latent notation; fillers and the other skills in the
    tested notation (so the notation is familiar, the tested skills' keywords are not)."""
    r = rng.random()
    if r < 0.15:
        return FILLERS[0].example(rng)
    if r < 0.55:
        return SKILLS[rng.choice(DISCOVERY)].latent_example(rng)
    return rng.choice([*FILLERS[1:], *(SKILLS[s] for s in TRANSFER)]).example(rng)


def _latent_narrow_3(rng: random.Random) -> Example:
    """Latent + narrow slice of the three tested skills; the transfer skills as fillers."""
    r = rng.random()
    if r < 0.15:
        return FILLERS[0].example(rng)
    if r < 0.45:
        return SKILLS[rng.choice(DISCOVERY)].latent_example(rng)
    if r < 0.60:
        return SKILLS[rng.choice(DISCOVERY)].narrow_example(rng)
    return rng.choice([*FILLERS[1:], *(SKILLS[s] for s in TRANSFER)]).example(rng)


MIXTURES: dict[str, Callable[[random.Random], Example]] = {
    "v1": _v1, "latent": _latent, "latent-narrow-3": _latent_narrow_3, "zoo": base_example,
}
ZOO = dict(hidden=128, heads=4, inter=256, mixture="zoo", lr=build.EXPERT_LR, steps=build.EXPERT_STEPS,
           replay=build.EXPERT_REPLAY, freeze_embeddings=False)
PRESETS: dict[str, dict[str, Any]] = {
    "v1": {**ZOO, "hidden": 64, "heads": 2, "inter": 128, "mixture": "v1", "lr": 5e-4, "steps": 400},
    "latent": {**ZOO, "mixture": "latent", "lr": 3e-4},
    "latent-frozen-embeddings": {**ZOO, "mixture": "latent", "lr": 3e-4, "freeze_embeddings": True},
    "latent-narrow-3": {**ZOO, "mixture": "latent-narrow-3", "lr": 3e-4},
    "zoo-lr3e-4": {**ZOO, "lr": 3e-4},
    "zoo-lr5e-4": {**ZOO, "lr": 5e-4},
    "zoo-lr1e-3": {**ZOO, "lr": 1e-3},
    "zoo": ZOO,
}


@torch.inference_mode()
def accuracy(model: LlamaForCausalLM, tasks: list, tokenizer: Any) -> dict[str, float]:
    model.eval()
    out = {}
    for skill in DISCOVERY:
        chunk = [t for t in tasks if t.skill == skill]
        enc = tokenizer([t.prompt for t in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        generated = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=2)
        texts = tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out[skill] = 100 * sum(x.split("\n")[0].strip() == t.answer for x, t in zip(texts, chunk, strict=True)) / len(chunk)
    out["average"] = sum(out[s] for s in DISCOVERY) / len(DISCOVERY)
    return out


def run_preset(name: str, p: dict[str, Any], seed: int) -> dict[str, Any]:
    started = time.time()
    tokenizer = char_tokenizer()
    tasks = make_tasks(seed=seed, n_dev=build.N_DEV, n_test=build.N_TEST, skills=DISCOVERY)
    held = {t.prompt for t in tasks} | {t.prompt for t in make_tasks(seed=seed, n_dev=build.N_DEV, n_test=build.N_TEST, skills=TRANSFER)}
    dev = [t for t in tasks if t.split == "dev"]
    test = [t for t in tasks if t.split == "test"]
    mixture = MIXTURES[p["mixture"]]

    def encode(pair: Example) -> tuple[list[int], list[int]]:
        return encode_pairs(tokenizer, [pair], prompt_loss=False)[0]

    torch.manual_seed(seed)
    base = LlamaForCausalLM(tiny_llama_config(len(tokenizer), hidden_size=p["hidden"], layers=2, heads=p["heads"],
                                              intermediate_size=p["inter"], max_positions=64))
    train_lm(base, lambda rng: encode(mixture(rng)), steps=build.BASE_STEPS, batch_size=64, lr=build.BASE_LR, seed=seed, pad_id=0)

    def fine_tune(skills: tuple[str, ...], run_seed: int, steps: int) -> LlamaForCausalLM:
        model = copy.deepcopy(base)
        for pname, param in model.named_parameters():
            param.requires_grad = not (p["freeze_embeddings"] and ("embed" in pname or "lm_head" in pname))

        def item(rng: random.Random) -> tuple[list[int], list[int]]:
            if rng.random() < p["replay"]:
                return encode(mixture(rng))
            while True:
                pair = SKILLS[rng.choice(skills)].example(rng)
                if pair[0] not in held:
                    return encode(pair)

        train_lm(model, item, steps=steps, batch_size=64, lr=p["lr"], seed=run_seed, pad_id=0)
        return model

    experts = [fine_tune((s,), seed * 100 + i + 1, p["steps"]) for i, s in enumerate(DISCOVERY)]
    multitask = fine_tune(DISCOVERY, seed * 100 + 99, p["steps"] * len(DISCOVERY))
    result: dict[str, Any] = {"preset": name, "seed": seed, "config": p, "base": accuracy(base, test, tokenizer)}
    for skill, expert in zip(DISCOVERY, experts, strict=True):
        result[f"expert:{skill}"] = accuracy(expert, test, tokenizer)
    result["multitask"] = accuracy(multitask, test, tokenizer)

    base_sd = base.state_dict()
    expert_sds = [e.state_dict() for e in experts]
    work = copy.deepcopy(base)

    def merged(method: str, **params: float) -> LlamaForCausalLM:
        fn = make_merge_fn(method, **params)
        work.load_state_dict({n: b + fn([e[n] - b for e in expert_sds], name=n, base=b) for n, b in base_sd.items()})
        return work

    scale = max(TA_SCALES, key=lambda s: accuracy(merged("task_arithmetic", scale=s), dev, tokenizer)["average"])
    result["ta_scale"] = scale
    result["merge:task_arithmetic"] = accuracy(merged("task_arithmetic", scale=scale), test, tokenizer)
    for method in ("ties", "dare", "model_stock"):
        result[f"merge:{method}"] = accuracy(merged(method), test, tokenizer)
    flat = [torch.cat([(e[n] - base_sd[n]).flatten() for n in base_sd]) for e in expert_sds]
    result["task_vector_cosines"] = [
        round(float(torch.nn.functional.cosine_similarity(flat[i], flat[j], dim=0)), 3)
        for i in range(len(flat)) for j in range(i + 1, len(flat))
    ]
    result["seconds"] = round(time.time() - started)
    return result


def row(r: dict[str, Any]) -> str:
    gains = " / ".join(f"{r[f'expert:{s}'][s] - r['base'][s]:.0f}" for s in DISCOVERY)
    best = max(r[f"expert:{s}"]["average"] for s in DISCOVERY)
    ta = r["merge:task_arithmetic"]["average"]
    others = " / ".join(f"{r[f'merge:{m}']['average']:.1f}" for m in ("ties", "dare", "model_stock"))
    return (f"| {r['preset']} (seed {r['seed']}) | {r['base']['average']:.1f} | {gains} | {best:.1f} | "
            f"{ta:.1f} (x{r['ta_scale']}) | {r['multitask']['average']:.1f} | {others} | {ta - best:+.1f} | "
            f"{r['multitask']['average'] - ta:+.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="append each preset's full result to this JSON-lines file")
    args = parser.parse_args()
    print("| preset | base | expert gains | best expert | TA | multi-task | TIES / DARE / MS | TA - best expert | room |")
    print("|---|---:|---|---:|---:|---:|---|---:|---:|")
    for name in args.presets:
        result = run_preset(name, PRESETS[name], args.seed)
        print(row(result), flush=True)
        if args.json:
            with open(args.json, "a") as out:
                out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
