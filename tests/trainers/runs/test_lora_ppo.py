"""PPO with LoRA in one process (no Ray), through the in-process rollout pool: only the adapters and the
value head train, the base stays bit-identical, the KL reference is the base with the adapters off, the
rollout engine receives merged weights (its sampling log-probs are the LoRA policy's right after a
sync), and a checkpoint (adapters, value head, optimizer, KL controller) resumes to the same next step."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("peft", reason="LoRA needs the lora extra: pip install -e '.[lora]'")

from rollout.interface import SamplingParams  # noqa: E402
from rollout.local_pool import LocalRolloutPool  # noqa: E402
from trainers.config import RolloutSettings, TrainConfig  # noqa: E402
from trainers.model import lora  # noqa: E402
from trainers.model.factory import load_model_and_tokenizer  # noqa: E402

STEPS = 4  # sync every 2: the engine holds versions 0, 2, 2, 4 during the steps


def _config(probe_dir, **overrides) -> TrainConfig:
    values = dict(model="tiny-pythia-1m", loss="ppo", max_train_pairs=64, micro_batch_size=8, ppo_minibatches=2,
                  ppo_max_new_tokens=8, num_probe_prompts=2, greedy_max_tokens=4, probe_set_dir=probe_dir, lr=1e-2,
                  warmup_steps=1, num_workers=1, max_steps=STEPS, lora_rank=4, lora_alpha=8.0,
                  rollout=RolloutSettings(num_actors=1, sync_every=2))
    values.update(overrides)
    return TrainConfig(**values)


def _trainer(config: TrainConfig):
    from trainers.runs.ppo_trainer import PPOTrainer

    pool = LocalRolloutPool.from_pretrained(config.model, num_engines=1, seed=config.seed,
                                            batch_size=config.micro_batch_size)
    trainer = PPOTrainer(config, pool=pool)
    return trainer, pool


def _token_logps(model, prompts, responses) -> list[torch.Tensor]:
    """log p of each response token, one unpadded sequence at a time (independent of the trainer's batching)."""
    rows = []
    with torch.no_grad():
        for prompt, response in zip(prompts, responses):
            ids = torch.tensor([list(prompt) + list(response)])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].double()
            logps = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            rows.append(logps[len(prompt) - 1:])
    return rows


def _base_weights_of(policy) -> dict[str, torch.Tensor]:
    """The PEFT model's frozen base weights under the plain model's names."""
    return {key.replace(".base_layer.", "."): value for key, value in policy.get_base_model().state_dict().items()
            if not any(part.startswith("lora_") for part in key.split("."))}


def _comparable(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.endswith("_s") and k != "rollout/tokens_per_s"}


@pytest.fixture(scope="module")
def run(builtin_probe_dir, tmp_path_factory):
    """The trainer after STEPS PPO steps with LoRA, its history, a fresh base model, and a checkpoint of step 2."""
    torch.set_num_threads(1)
    config = _config(builtin_probe_dir)
    trainer, pool = _trainer(config)
    base, _ = load_model_and_tokenizer(config.model, seed=config.seed)
    base.eval()
    trainer.prepare()
    checkpoint = tmp_path_factory.mktemp("ppo-lora-checkpoint")
    history = []
    for _ in range(STEPS):
        history.append(trainer.train_step())
        if trainer.step == 2:
            trainer.save_checkpoint(checkpoint)
    return config, trainer, pool, base, history, checkpoint


def test_only_adapters_and_value_head_train_and_the_base_stays_bit_identical(run):
    _, trainer, _, base, history, _ = run
    assert all(math.isfinite(step["ppo/reward"]) and math.isfinite(step["train/loss"]) for step in history)
    model = trainer.model  # PolicyWithValue(PeftModel)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or name.startswith("value_head.") for name in trainable)
    assert {"value_head.weight", "value_head.bias"} <= trainable
    # the optimizer kept state (it saw gradients) for exactly the trainable parameters, none for the base
    with_state = {name for name, p in model.named_parameters() if p in trainer.optimizer.state}
    assert with_state == trainable
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert all(float(p.detach().abs().max()) > 0 for name, p in model.named_parameters() if "lora_B" in name)  # B started at 0
    plain = base.state_dict()
    ours = _base_weights_of(trainer.language_model())
    assert set(ours) == set(plain)
    changed = [key for key, value in ours.items() if not torch.equal(value, plain[key])]
    assert not changed, changed[:5]


def test_the_kl_reference_is_the_base_with_adapters_off(run):
    from rollout.interface import SamplingParams as Params
    from trainers.data.collate import collate_sequences
    from trainers.runs.ppo_trainer import reference_logps

    _, trainer, pool, base, history, _ = run
    assert isinstance(trainer.reference_model, lora.AdaptersDisabled)
    # no second copy: every reference tensor is one of the policy's
    assert {id(p) for p in trainer.reference_model.parameters()} <= {id(p) for p in trainer.model.parameters()}
    assert history[0]["ppo/kl"] == pytest.approx(0.0, abs=1e-6)  # adapters start as the identity (B = 0)
    assert history[-1]["ppo/kl"] != pytest.approx(0.0, abs=1e-4)
    prompts = [trainer.pairs[i].prompt_ids for i in range(4)]
    responses = pool.generate(prompts, Params(max_new_tokens=6, seed=3)).token_ids
    responses = [r if r else [trainer.tokenizer.eos_token_id] for r in responses]
    batch = collate_sequences(prompts, responses, trainer.tokenizer.pad_token_id)
    got = reference_logps(trainer.reference_model, batch, [len(r) for r in responses])
    expected = _token_logps(base, prompts, responses)
    adapted = _token_logps(trainer.language_model(), prompts, responses)
    for row, (want, policy) in enumerate(zip(expected, adapted)):
        torch.testing.assert_close(got[row, :len(want)].double(), want, rtol=0, atol=1e-5)
        assert float((policy - want).abs().max()) > 1e-4  # the policy itself has moved away from the base


def test_the_rollout_engine_holds_the_merged_weights(run):
    config, trainer, pool, base, history, _ = run
    assert [step["rollout/policy_version"] for step in history] == [0, 2, 2, 4]
    assert pool.versions() == [STEPS] and trainer.policy_version == STEPS
    # engine sampling log-probs vs the trainer's LoRA model, inside the PPO step: equal right after a sync,
    # a version behind one update later
    mismatch = [step["ppo/logprob_mismatch"] for step in history]
    assert all(m < 1e-5 for m in mismatch[0::2]) and all(m > 1e-3 for m in mismatch[1::2]), mismatch
    # and now (after the sync at step 4), checked from outside: fresh samples, scored one by one
    prompts = [trainer.pairs[i].prompt_ids for i in range(6)]
    sampled = pool.generate(prompts, SamplingParams(max_new_tokens=8, seed=7))
    assert sampled.policy_version == STEPS
    policy = _token_logps(trainer.language_model(), prompts, sampled.token_ids)
    start = _token_logps(base, prompts, sampled.token_ids)
    for engine_row, ours, theirs in zip(sampled.logprobs, policy, start):
        torch.testing.assert_close(torch.tensor(engine_row, dtype=torch.float64), ours, rtol=0, atol=1e-5)
        assert float((ours - theirs).abs().max()) > 1e-4  # the merged delta is not zero
    # the engine's weights are the base model's names with W + (alpha / r) B A, as PEFT's own merge gives
    engine_state = pool.engines[0].model.state_dict()
    import copy

    by_peft = copy.deepcopy(trainer.language_model()).merge_and_unload().state_dict()
    assert set(by_peft) <= set(engine_state)
    for key, value in by_peft.items():
        torch.testing.assert_close(engine_state[key], value, rtol=0, atol=1e-6)
    assert any(not torch.equal(engine_state[k], v) for k, v in base.state_dict().items() if k in by_peft)


def test_the_checkpoint_holds_adapters_and_value_head_and_resumes_to_the_same_step(run):
    config, trainer, _, _, history, checkpoint = run
    saved = torch.load(checkpoint / "train_state.pt", weights_only=True)
    assert {"value_head.weight", "value_head.bias"} <= set(saved["model"])
    assert all(k.startswith("value_head.") or "lora_" in k for k in saved["model"])
    assert saved["step"] == 2 and "kl_controller" in saved
    resumed, pool = _trainer(config)
    resumed.load_checkpoint(checkpoint)
    resumed.prepare()  # syncs the restored (merged) weights to its fresh engine
    assert resumed.step == 2 and pool.versions() == [2]
    again = [resumed.train_step() for _ in range(STEPS - 2)]
    # the resumed run's first step also reports the engine-trainer mismatch measured at its resume sync
    assert again[0]["rollout/probe_mismatch_max"] < 1e-5
    for got, want in zip(again, history[2:]):
        got, want = _comparable(got), _comparable(want)
        assert set(want) <= set(got)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    for (name, a), (_, b) in zip(resumed.model.named_parameters(), trainer.model.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
