"""LoRA (PEFT) on tiny Llama/GQA and GPT-NeoX models: the reference is the base with the adapters off,
only adapters train, merged weights compute what the adapted model computes (checked against PEFT's
own merge and by log-probs), checkpoints round-trip, and the training run uses all of it."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

peft = pytest.importorskip("peft", reason="LoRA needs the lora extra: pip install -e '.[lora]'")

from trainers.config import TrainConfig  # noqa: E402
from trainers.model import lora  # noqa: E402
from trainers.model.logprobs import sequence_logps  # noqa: E402

VOCAB = 96


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """Llama with grouped-query attention (4 query heads share 2 key/value heads), like SmolLM2."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def batch(seed: int = 0, rows: int = 4, length: int = 10) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, length), generator=generator)
    labels = ids.clone()
    labels[:, :4] = -100  # a 4-token prompt, the rest is the scored response
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def logps(model, data) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    return sequence_logps(logits, data["labels"])[0]


def train_a_few_steps(model, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        data = batch(seed=10 + step)
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        loss = -sequence_logps(logits, data["labels"])[0].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.fixture()
def trained():
    """(untouched copy of the base, LoRA policy after 3 steps)."""
    base = tiny_llama()
    untouched = copy.deepcopy(base)
    policy = lora.apply_lora(base, rank=4, alpha=8.0, targets="all-linear", seed=0)
    train_a_few_steps(policy)
    return untouched, policy


def test_rank_zero_is_a_no_op():
    model = tiny_llama()
    assert lora.apply_lora(model, 0, 16.0, "all-linear") is model
    assert lora.find_lora(model) is None
    assert set(lora.merged_state_dict(model)) == set(model.state_dict())


def test_adapters_start_as_the_identity_and_init_follows_the_seed():
    data = batch()
    base = tiny_llama()
    expected = logps(base, data)
    a = lora.apply_lora(copy.deepcopy(base), 4, 8.0, "q_proj,v_proj", seed=0)
    b = lora.apply_lora(copy.deepcopy(base), 4, 8.0, "q_proj,v_proj", seed=0)
    c = lora.apply_lora(copy.deepcopy(base), 4, 8.0, "q_proj,v_proj", seed=1)
    torch.testing.assert_close(logps(a, data), expected, rtol=0, atol=1e-6)  # B = 0 at the start
    adapters = {k: v for k, v in a.state_dict().items() if "lora_A" in k}
    assert adapters and all(".q_proj." in k or ".v_proj." in k for k in adapters)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in adapters.items())
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in adapters.items())


def test_reference_is_the_base_with_adapters_off_and_no_copy(trained):
    untouched, policy = trained
    reference = lora.frozen_reference(policy)
    assert isinstance(reference, lora.AdaptersDisabled)
    policy_ids = {id(p) for p in policy.parameters()}
    assert {id(p) for p in reference.parameters()} <= policy_ids  # the same tensors, not a second model
    data = batch(seed=99)
    adapted = logps(policy, data)
    assert (adapted - logps(untouched, data)).abs().max() > 1e-3  # training moved the policy
    torch.testing.assert_close(logps(reference, data), logps(untouched, data), rtol=0, atol=1e-5)
    torch.testing.assert_close(logps(policy, data), adapted, rtol=0, atol=0)  # adapters are back on afterwards
    policy.train()
    reference.eval()  # must not switch the shared policy's mode
    assert policy.training
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)


def test_only_adapter_weights_change(trained):
    untouched, policy = trained
    before = untouched.state_dict()
    changed_adapters = 0
    for key, value in policy.get_base_model().state_dict().items():
        if "lora_" in key:
            changed_adapters += "lora_B" in key and bool(value.abs().max() > 0)
            continue
        assert torch.equal(value, before[key.replace(".base_layer.", ".")]), f"{key} changed"
    assert changed_adapters == 2 * 7  # per layer: q, k, v, o, gate, up, down


def test_merged_weights_compute_what_the_adapted_model_computes(trained):
    untouched, policy = trained
    merged = lora.merged_state_dict(policy)
    plain = copy.deepcopy(untouched)
    plain.load_state_dict(merged, strict=True)  # exactly the base architecture's names
    data = batch(seed=7)
    torch.testing.assert_close(logps(plain, data), logps(policy, data), rtol=0, atol=1e-4)
    # an independent computation of the same weights: PEFT's own merge on a copy
    by_peft = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert set(by_peft) == set(merged)
    for key, value in by_peft.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6)
    # the policy itself was not modified (no merge/unmerge round trip)
    assert not any(getattr(m, "merged", False) for m in policy.modules())


def test_checkpoint_holds_only_adapters_and_round_trips(trained):
    untouched, policy = trained
    state = lora.checkpoint_state(policy)
    assert state and all("lora_" in key for key in state)
    assert sum(v.numel() for v in state.values()) < sum(v.numel() for v in untouched.state_dict().values()) / 5
    fresh = lora.apply_lora(copy.deepcopy(untouched), 4, 8.0, "all-linear", seed=5)  # other random A
    data = batch(seed=3)
    assert (logps(fresh, data) - logps(policy, data)).abs().max() > 1e-3
    lora.load_checkpoint_state(fresh, state)
    torch.testing.assert_close(logps(fresh, data), logps(policy, data), rtol=0, atol=0)
    other_rank = lora.apply_lora(copy.deepcopy(untouched), 2, 8.0, "all-linear", seed=5)
    with pytest.raises(RuntimeError, match="size mismatch"):
        lora.load_checkpoint_state(other_rank, state)
    fewer_targets = lora.apply_lora(copy.deepcopy(untouched), 4, 8.0, "q_proj", seed=5)
    with pytest.raises(ValueError, match="does not fit this LoRA model"):
        lora.load_checkpoint_state(fewer_targets, state)


def test_value_head_is_checkpointed_with_the_adapters(trained):
    from trainers.runs.ppo_trainer import PolicyWithValue

    _, policy = trained
    state = lora.checkpoint_state(PolicyWithValue(policy))
    assert {"value_head.weight", "value_head.bias"} <= set(state)
    assert all(k.startswith("value_head.") or "lora_" in k for k in state)


def test_saved_folder_is_plain_merged_weights_with_the_adapters_beside(trained, tmp_path):
    untouched, policy = trained
    lora.save_pretrained(policy, tmp_path)
    data = batch(seed=11)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert lora.find_lora(reloaded) is None
    torch.testing.assert_close(logps(reloaded, data), logps(policy, data), rtol=0, atol=1e-4)
    adapters = peft.PeftModel.from_pretrained(copy.deepcopy(untouched), tmp_path / lora.ADAPTER_DIR).eval()
    torch.testing.assert_close(logps(adapters, data), logps(policy, data), rtol=0, atol=1e-5)


def test_config_checks():
    assert TrainConfig().lora_rank == 0
    with pytest.raises(ValueError, match="lora-rank"):
        TrainConfig(lora_rank=-1)
    with pytest.raises(ValueError, match="lora-alpha"):
        TrainConfig(lora_rank=4, lora_alpha=0)
    with pytest.raises(ValueError, match="deepspeed"):
        TrainConfig(lora_rank=4, strategy="deepspeed")
    with pytest.raises(ValueError, match="lora-target-modules"):
        TrainConfig(lora_rank=4, lora_target_modules=" , ")
    with pytest.raises(ValueError, match="--lora-target-modules 'no_such_layer'"):
        lora.apply_lora(tiny_llama(), 4, 8.0, "no_such_layer")


# --- the training run (trainers.runs.policy_trainer) with LoRA on the built-in GPT-NeoX model ---

def _config(probe_dir, **overrides) -> TrainConfig:
    values = dict(model="tiny-pythia-1m", max_train_pairs=32, micro_batch_size=4, max_steps=3, eval_every=3,
                  num_probe_prompts=2, greedy_max_tokens=6, probe_set_dir=probe_dir, loss="dpo", beta=0.1, lr=1e-2,
                  warmup_steps=1, num_workers=1, lora_rank=4, lora_alpha=8.0)
    values.update(overrides)
    return TrainConfig(**values)


def _preference_logps(model, trainer) -> tuple[torch.Tensor, torch.Tensor]:
    from trainers.data.collate import collate_preference_batch
    from trainers.model.objectives import forward_logps

    pairs = trainer.pairs[:8]
    with torch.no_grad():
        sums, _, _ = forward_logps(model, collate_preference_batch(pairs, trainer.tokenizer.pad_token_id))
    return sums[:len(pairs)], sums[len(pairs):]


def test_policy_trainer_with_lora(builtin_probe_dir, tmp_path):
    from trainers.model.factory import load_model_and_tokenizer
    from trainers.runs.policy_trainer import PolicyTrainer

    torch.set_num_threads(1)
    config = _config(builtin_probe_dir)
    trainer = PolicyTrainer(config)
    trainer.prepare()
    assert isinstance(trainer.reference_model, lora.AdaptersDisabled)
    base, _ = load_model_and_tokenizer(config.model, seed=config.seed)
    base.eval()
    history = [trainer.train_step() for _ in range(config.max_steps)]
    assert history[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)  # adapters start as the identity
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    # the reference (adapters off) is still exactly the base model, the policy is not
    for ref, expected, policy in zip(_preference_logps(trainer.reference_model, trainer), _preference_logps(base, trainer),
                                     _preference_logps(trainer.language_model(), trainer)):
        torch.testing.assert_close(ref, expected, rtol=0, atol=1e-4)
        assert (policy - expected).abs().max() > 1e-3
    summary, _ = trainer.evaluate()  # probes score and decode through the PEFT model
    assert math.isfinite(summary["logp/chosen"])

    # the checkpoint holds the adapters (and optimizer state) only, and restores the same policy
    trainer.save_checkpoint(tmp_path)
    saved = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert saved["model"] and all("lora_" in k for k in saved["model"])
    restored = PolicyTrainer(config)
    restored.load_checkpoint(tmp_path)
    restored.prepare()
    assert restored.step == config.max_steps
    for a, b in zip(_preference_logps(restored.language_model(), trainer), _preference_logps(trainer.language_model(), trainer)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(restored.train_step()["train/loss"], trainer.train_step()["train/loss"], rtol=0, atol=1e-6)

    # rollout engines get merged weights under the base model's names; the saved folder is plain HF
    merged = lora.merged_state_dict(trainer.language_model())
    assert set(merged) == set(base.state_dict())
    plain = copy.deepcopy(base)
    plain.load_state_dict(merged)
    for a, b in zip(_preference_logps(plain, trainer), _preference_logps(trainer.language_model(), trainer)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)
    trainer.save_pretrained(str(tmp_path / "final"))
    reloaded, _ = load_model_and_tokenizer(str(tmp_path / "final"))
    for a, b in zip(_preference_logps(reloaded.eval(), trainer), _preference_logps(trainer.language_model(), trainer)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)


def test_shared_reference_logps_still_apply_under_lora(builtin_probe_dir, tmp_path):
    """The sweep computes reference log-probs once from the base model; a LoRA trial finds them by key."""
    from trainers.model.factory import load_model_and_tokenizer
    from trainers.runs.policy_trainer import PolicyTrainer
    from trainers.runs.reference_logps import load_or_compute_reference_logps

    torch.set_num_threads(1)
    config = _config(builtin_probe_dir, max_steps=2)
    probe = PolicyTrainer(config)  # only for its tokenized pairs
    base, tokenizer = load_model_and_tokenizer(config.model, seed=config.seed)
    load_or_compute_reference_logps(base, probe.pairs, tokenizer.pad_token_id, tmp_path)
    shared = PolicyTrainer(_config(builtin_probe_dir, max_steps=2, reference_logps_dir=str(tmp_path)))
    assert shared.reference_model is None and shared.reference_logps is not None
    shared.prepare()
    probe.prepare()
    for a, b in zip([shared.train_step() for _ in range(2)], [probe.train_step() for _ in range(2)]):
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-5)
