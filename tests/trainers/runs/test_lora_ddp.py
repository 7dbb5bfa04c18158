"""LoRA with two DDP workers under real Ray Train (gloo on CPU): a DPO trial's real Train loop
(evaluations through the PEFT model, a checkpoint, the final merged folder), then, in the same worker
group, the same run twice more -- once with the adapters-off reference, once with the sweep's shared
reference log-probs (computed from the base model by the sweep's own task) -- whose adapters and base
weights every rank hands back. Checked: both ranks hold the same adapters after the steps although
they trained on different shards (DDP averaged the gradients), the base stays bit-identical on both,
the shared log-probs give the same losses as the adapters-off reference, the saved folder loads with
plain transformers and equals the merged weights of the checkpoint's adapters. And PPO with LoRA through
a Ray rollout actor: the object-store weight sync delivers merged weights."""
from __future__ import annotations

import copy
import os

import pytest
import torch

peft = pytest.importorskip("peft", reason="LoRA needs the lora extra: pip install -e '.[lora]'")

pytestmark = pytest.mark.ray

STEPS = 3


def test_lora_dpo_with_two_ddp_workers(local_ray, builtin_probe_dir, tmp_path):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from dataclasses import replace

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoModelForCausalLM

    from sweeps.stages import _reference_logps_task
    from trainers.config import TrainConfig
    from trainers.model import lora
    from trainers.model.factory import load_model_and_tokenizer
    from trainers.runs.policy_trainer import model_is_complete

    def worker(loop_config: dict) -> None:  # nested: shipped by value to the Train workers
        import ray.train
        import ray.train.torch
        import torch

        from trainers.model import lora
        from trainers.runs.policy_trainer import PolicyTrainer
        from trainers.runs.train_loop import gather_from_ranks, train_loop_per_worker

        train_loop_per_worker(loop_config)  # the trial's own loop: DDP via Train's prepare_model
        rank = ray.train.get_context().get_world_rank()
        world = ray.train.get_context().get_world_size()
        results = {}
        for name, config in (("own_reference", loop_config["train"]),
                             ("shared_reference", loop_config["shared_train"])):
            trainer = PolicyTrainer(config, rank, world, wrap_model=ray.train.torch.prepare_model)
            trainer.prepare()
            first_batch = trainer.batches.batch(0)
            losses = [trainer.train_step()["train/loss"] for _ in range(config.max_steps)]
            policy = trainer.language_model()
            base = {k.replace(".base_layer.", "."): v.detach().clone() for k, v in policy.get_base_model().state_dict().items()
                    if not any(part.startswith("lora_") for part in k.split("."))}
            results[name] = gather_from_ranks({
                "wrapped": type(trainer.model).__name__, "reference": type(trainer.reference_model).__name__,
                "first_batch": first_batch, "losses": losses, "base": base,
                "adapters": {k: v.detach().clone() for k, v in lora.checkpoint_state(policy).items()}})
        if rank == 0:
            torch.save(results, loop_config["results_file"])

    torch.set_num_threads(1)
    train = TrainConfig(model="tiny-pythia-1m", loss="dpo", beta=0.1, lr=1e-2, warmup_steps=1, max_train_pairs=32,
                        micro_batch_size=4, max_steps=STEPS, eval_every=STEPS, num_probe_prompts=2, greedy_max_tokens=4,
                        probe_set_dir=builtin_probe_dir, num_workers=2, cpus_per_worker=0.5, lora_rank=4, lora_alpha=8.0)
    # the sweep's shared reference log-probs: its own task, on the base model (no LoRA), before any trial starts
    reference_dir = tmp_path / "reference_logps"
    path, computed, _ = _reference_logps_task(train, str(reference_dir))
    assert computed and os.path.exists(path)
    torch.set_num_threads(1)
    final_dir, results_file = tmp_path / "final", tmp_path / "results.pt"
    fit = TorchTrainer(worker,
                       train_loop_config={"train": train, "final_model_dir": str(final_dir), "probe_set_hash": None,
                                          "shared_train": replace(train, reference_logps_dir=str(reference_dir)),
                                          "results_file": str(results_file)},
                       scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                       run_config=RunConfig(name="lora-ddp", storage_path=str(tmp_path / "runs"))).fit()
    assert fit.error is None, fit.error
    results = torch.load(results_file, weights_only=True)
    fresh, _ = load_model_and_tokenizer(train.model, seed=train.seed)
    fresh_state = fresh.state_dict()

    for name, ranks in results.items():
        assert len(ranks) == 2
        assert all(r["wrapped"] == "DistributedDataParallel" for r in ranks), name
        assert ranks[0]["first_batch"] != ranks[1]["first_batch"]  # each rank trained on its own shard
        assert ranks[0]["losses"] == ranks[1]["losses"]  # averaged over the ranks
        adapters = [r["adapters"] for r in ranks]
        assert adapters[0] and set(adapters[0]) == set(adapters[1]) and all("lora_" in k for k in adapters[0])
        for key, value in adapters[0].items():  # DDP averaged the gradients: one set of adapters
            assert torch.equal(value, adapters[1][key]), (name, key)
        assert all(float(v.abs().max()) > 0 for k, v in adapters[0].items() if "lora_B" in k)  # they trained
        for rank in ranks:  # the base is frozen on every rank
            assert set(rank["base"]) == set(fresh_state)
            changed = [k for k, v in rank["base"].items() if not torch.equal(v, fresh_state[k])]
            assert not changed, (name, changed[:3])
    own, shared = results["own_reference"], results["shared_reference"]
    assert own[0]["reference"] == "AdaptersDisabled" and shared[0]["reference"] == "NoneType"
    # the shared file (keyed on the base before LoRA) stands in for the adapters-off reference
    assert shared[0]["losses"] == pytest.approx(own[0]["losses"], abs=1e-5)
    assert own[0]["losses"][-1] < own[0]["losses"][0]
    for key, value in own[0]["adapters"].items():
        torch.testing.assert_close(shared[0]["adapters"][key], value, rtol=0, atol=1e-5)

    # the trial's own loop: its checkpoint holds the adapters only, the same as the repeated run's
    with fit.checkpoint.as_directory() as directory:
        state = torch.load(os.path.join(directory, "train_state.pt"), weights_only=True)
    assert state["step"] == STEPS and set(state["model"]) == set(own[0]["adapters"])
    for key, value in state["model"].items():
        torch.testing.assert_close(value, own[0]["adapters"][key], rtol=0, atol=1e-6)
    # its final folder: plain transformers loads it, and it holds the merged weights of those adapters
    assert model_is_complete(final_dir) and (final_dir / lora.ADAPTER_DIR).is_dir()
    reloaded = AutoModelForCausalLM.from_pretrained(final_dir, dtype=torch.float32).eval()
    assert lora.find_lora(reloaded) is None
    policy = lora.apply_lora(copy.deepcopy(fresh), train.lora_rank, train.lora_alpha, train.lora_target_modules, seed=99)
    lora.load_checkpoint_state(policy, state["model"])
    merged = policy.merge_and_unload().state_dict()  # PEFT's own merge, on the checkpoint's adapters
    saved = reloaded.state_dict()
    assert set(merged) <= set(saved)
    for key, value in merged.items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=1e-6)
    assert any(not torch.equal(saved[k], fresh_state[k]) for k in merged)  # merged, not the base


def test_ppo_with_lora_syncs_merged_weights_to_ray_rollout_actors(local_ray, builtin_probe_dir):
    """The actor path of the weight sync (object store, checked by each actor's tensor count and sum):
    a Ray rollout actor gets the merged weights, so after each sync its log-probs are the LoRA policy's."""
    from rollout.actors import RolloutConfig, RolloutPool
    from rollout.interface import SamplingParams
    from trainers.config import RolloutSettings, TrainConfig
    from trainers.model.factory import load_model_and_tokenizer
    from trainers.model.logprobs import score_responses
    from trainers.runs.ppo_trainer import PPOTrainer

    torch.set_num_threads(1)
    config = TrainConfig(model="tiny-pythia-1m", loss="ppo", max_train_pairs=32, micro_batch_size=8, ppo_minibatches=2,
                         ppo_max_new_tokens=6, num_probe_prompts=2, greedy_max_tokens=4, probe_set_dir=builtin_probe_dir,
                         lr=1e-2, warmup_steps=1, num_workers=1, max_steps=2, lora_rank=4, lora_alpha=8.0,
                         rollout=RolloutSettings(num_actors=1, cpus_per_actor=0.5, sync_every=1, engine="hf"))
    actors = RolloutPool(RolloutConfig(model=config.model, num_actors=1, cpus_per_actor=0.5, engine="hf",
                                       batch_size=config.micro_batch_size, seed=config.seed, timeout_s=300))
    try:
        trainer = PPOTrainer(config, pool=actors)
        trainer.prepare()
        history = [trainer.train_step() for _ in range(config.max_steps)]
        assert trainer.weight_sync_way == "object-store" and actors.versions() == [2]
        assert [step["rollout/policy_version"] for step in history] == [1, 2]
        # step 2 sampled with version 1 (adapters already moved): the actor's sampling log-probs are the policy's
        assert all(step["ppo/logprob_mismatch"] < 1e-5 for step in history), history
        prompts = [trainer.pairs[i].prompt_ids for i in range(4)]
        responses = [r or [trainer.tokenizer.eos_token_id]
                     for r in actors.generate(prompts, SamplingParams(max_new_tokens=6, seed=5)).token_ids]
        pad = trainer.tokenizer.pad_token_id
        base, _ = load_model_and_tokenizer(config.model, seed=config.seed)
        ours = score_responses(trainer.language_model().eval(), prompts, responses, pad)
        start = score_responses(base.eval(), prompts, responses, pad)
        for remote, mine, original in zip(actors.score(prompts, responses), ours, start):
            assert remote == pytest.approx(mine, abs=1e-5)
            assert max(abs(a - b) for a, b in zip(mine, original)) > 1e-4  # the adapters moved the policy
    finally:
        actors.shutdown()
