"""DeepSpeed ZeRO as the training strategy: the same run as DDP, resumable from sharded checkpoints.

Two processes on torch.distributed (gloo on 127.0.0.1, as Ray Train sets it up) run DPO on the
tiny model with DDP, ZeRO-2 and ZeRO-3 one after the other, then fresh processes resume ZeRO-2 and
ZeRO-3 from their step-4 checkpoints. One short sweep through Ray checks the wiring end to end.

Tolerances: the three strategies run the same float32 math on the same batches; they differ only
in the order gradients are summed (across ranks and micro-batches) and in how the clipping norm is
accumulated (DeepSpeed sums partition norms in float64): rounding at float32's 1.2e-7 relative
precision. Metrics may therefore differ by ~1e-7 relative; the bound is 1e-5 x (1 + |value|), which
still fails on any real difference (a missed clip, a wrong accumulation scale, a skipped scheduler
step all move the loss by > 1e-3 here). Weights: Adam divides each gradient by its own running
magnitude, so where a gradient is almost nothing but rounding (rare tokens' embedding rows, the key
biases, which softmax ignores) the rounding is blown up to a sizeable fraction of an lr-sized step;
those few entries may differ by up to ~0.1 x lr = 1e-4, while the weights as a whole must agree to
1e-5 relative (L2).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from trainers.config import TrainConfig

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed is not installed (pip install -e '.[deepspeed]')")

STEPS, SAVE_AT, LOSS_TOLERANCE = 8, 4, 1e-5
WEIGHT_MAX_TOLERANCE, WEIGHT_RELATIVE_TOLERANCE = 1e-4, 1e-5
STRATEGIES = {"ddp": {"strategy": "ddp"}, "zero2": {"strategy": "deepspeed", "zero_stage": 2},
              "zero3": {"strategy": "deepspeed", "zero_stage": 3}}
OTHER_LOSSES = {"sft": "zero3", "ipo": "zero2"}   # 3 steps each, DDP vs this strategy
CURVE_KEYS = ("train/loss", "train/lr", "train/grad_norm", "dpo/reward_margin", "dpo/logp_chosen")


def _config(probe_dir: str, **overrides) -> dict:
    # 3 probe prompts over 2 ranks: the ranks decode different numbers of prompts (a ZeRO-3 hazard)
    values = dict(model="tiny-pythia-1m", max_train_pairs=64, micro_batch_size=4, grad_accum_steps=2,
                  max_steps=STEPS, num_probe_prompts=3, greedy_max_tokens=8, probe_set_dir=probe_dir, loss="dpo",
                  beta=0.1, lr=1e-3, warmup_steps=3, max_grad_norm=1.0, num_workers=2)
    values.update(overrides)
    return TrainConfig(**values).to_dict()


class _RecordingPool:
    """Stands in for the rollout actors: keeps what sync_weights pushes."""

    num_engines = 0  # nothing to score the probe mismatch with

    def __init__(self):
        self.pushed = None

    def sync_weights(self, state_dict, version):
        self.pushed = {k: v.detach().clone() for k, v in state_dict.items()}
        return 0.0


def _run_job(rank: int, world: int, job: dict, out: Path) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from trainers.runs.policy_trainer import PolicyTrainer

    config = TrainConfig.from_dict(job["config"])
    result = {}
    trainer = PolicyTrainer(config, rank, world, wrap_model=DistributedDataParallel if config.strategy == "ddp" else None)
    if job.get("resume"):
        trainer.load_checkpoint(job["resume"])
    trainer.prepare()
    result["start_step"] = trainer.step
    if trainer.strategy is not None and trainer.strategy.partitions_parameters:
        module = trainer.model.module
        result["partitioned"] = [n for n, p in module.named_parameters() if p.numel() < p.ds_numel]
        reference = trainer.reference_model.parameters() if trainer.reference_model is not None else []
        result["reference_plain"] = not any(hasattr(p, "ds_id") for p in reference)
    evals, history = {}, []
    if trainer.step == 0:
        evals[0] = trainer.evaluate()[0]
    while trainer.step < config.max_steps:
        history.append({"step": trainer.step + 1, **trainer.train_step()})
        if trainer.step == job.get("save_at"):
            mine = out / f"{job['name']}-ckpt" / f"rank{rank}"
            mine.mkdir(parents=True)
            if trainer.checkpoint_on_every_rank or rank == 0:
                trainer.save_checkpoint(mine)
            dist.barrier()
            if rank == 0:  # what Ray Train does with every rank's folder: one merged checkpoint folder
                merged = out / f"{job['name']}-ckpt" / "merged"
                files = sorted(p.relative_to(d) for d in mine.parent.glob("rank*") for p in d.rglob("*") if p.is_file())
                result["file_clash"] = len(files) != len(set(files))
                for folder in sorted(mine.parent.glob("rank*")):
                    shutil.copytree(folder, merged, dirs_exist_ok=True)
            dist.barrier()
    evals[trainer.step] = trainer.evaluate()[0]
    # before save_pretrained: transformers saves through accelerate, which imports deepspeed if installed
    result["deepspeed_imported"] = "deepspeed" in sys.modules
    trainer.gather_weights()
    trainer.pool, trainer.policy_version = _RecordingPool(), -1
    trainer.sync_weights()
    if rank == 0:
        result["weights"] = {k: v.detach().clone() for k, v in trainer.language_model().state_dict().items()}
        result["pushed"] = trainer.pool.pushed
        trainer.save_pretrained(str(out / f"{job['name']}-model"))
    trainer.pool = None
    result.update(history=history, evals=evals)
    return result


def _worker(rank: int, world: int, port: int, jobs: list[dict], out: Path) -> None:
    import torch.distributed as dist

    os.environ["LOCAL_RANK"] = str(rank)   # as a launcher (Ray Train, torchrun) sets it
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))  # a deadlocked collective fails instead of hanging
    try:
        results = {job["name"]: _run_job(rank, world, job, out) for job in jobs}
        torch.save(results, out / f"results-{jobs[0]['name']}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(jobs: list[dict], out: Path, timeout_s: float = 420) -> list[dict]:
    """Run the jobs in order in 2 fresh processes; each rank's results."""
    import torch.multiprocessing as mp

    context = mp.spawn(_worker, args=(2, _free_port(), jobs, out), nprocs=2, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the 2-process run did not finish in {timeout_s}s (a deadlock?)")
    return [torch.load(out / f"results-{jobs[0]['name']}-rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def runs(builtin_probe_dir, tmp_path_factory):
    """Uninterrupted DDP, ZeRO-2 and ZeRO-3 runs (ZeRO ones checkpoint at SAVE_AT), then ZeRO-2 and
    ZeRO-3 resumed from those checkpoints in fresh processes."""
    from trainers.model.factory import load_tokenizer

    load_tokenizer("tiny-pythia-1m")  # build the cached tokenizer once, before two processes race for it
    out = tmp_path_factory.mktemp("zero")
    started = time.perf_counter()
    full = _spawn([{"name": name, "config": _config(builtin_probe_dir, **values), "save_at": None if name == "ddp" else SAVE_AT}
                   for name, values in STRATEGIES.items()], out)
    full_s = time.perf_counter() - started
    resumed = _spawn([{"name": f"{name}-resumed", "config": _config(builtin_probe_dir, **STRATEGIES[name]),
                       "resume": str(out / f"{name}-ckpt" / "merged")} for name in ("zero2", "zero3")]
                     + [{"name": f"{loss}-{name}", "config": _config(builtin_probe_dir, loss=loss, max_steps=3, **STRATEGIES[name])}
                        for loss, strategy in OTHER_LOSSES.items() for name in ("ddp", strategy)], out)
    print(f"\n2-process runs: uninterrupted {full_s:.1f}s, resumed {time.perf_counter() - started - full_s:.1f}s")
    return {**full[0], **resumed[0]}, {**full[1], **resumed[1]}, out


def _max_difference(a: list[dict], b: list[dict], key: str) -> float:
    assert [row["step"] for row in a] == [row["step"] for row in b]
    return max(abs(x[key] - y[key]) for x, y in zip(a, b))


def _max_weight_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _relative_weight_difference(a: dict, b: dict) -> float:
    squared = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    return (squared / sum(float(a[k].pow(2).sum()) for k in a)) ** 0.5


def test_zero2_and_zero3_follow_the_ddp_curve(runs):
    rank0, _, _ = runs
    ddp = rank0["ddp"]["history"]
    assert [row["step"] for row in ddp] == list(range(1, STEPS + 1))
    assert ddp[0]["train/loss"] == pytest.approx(0.6931472, abs=1e-6)   # policy == reference: log 2
    assert ddp[-1]["train/loss"] < ddp[0]["train/loss"] - 0.01           # it learns, so the comparison means something
    assert any(row["train/grad_norm"] > 1.0 for row in ddp)              # clipping is active
    assert [row["train/lr"] for row in ddp[:4]] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])
    for name in ("zero2", "zero3"):
        for key in CURVE_KEYS:
            difference = _max_difference(ddp, rank0[name]["history"], key)
            print(f"{name} vs ddp, max |delta {key}| = {difference:.2e}")
            assert difference <= LOSS_TOLERANCE * (1 + abs(ddp[0][key])), (name, key)


def test_final_weights_and_probe_curves_agree(runs):
    rank0, _, _ = runs
    reference = rank0["ddp"]
    for name in ("zero2", "zero3"):
        largest = _max_weight_difference(reference["weights"], rank0[name]["weights"])
        relative = _relative_weight_difference(reference["weights"], rank0[name]["weights"])
        print(f"{name} vs ddp, weights: max |delta| = {largest:.2e}, relative L2 = {relative:.2e}")
        assert largest <= WEIGHT_MAX_TOLERANCE and relative <= WEIGHT_RELATIVE_TOLERANCE, name
        for step, summary in reference["evals"].items():
            # grad_cos needs whole parameters, so ZeRO runs skip it; every other curve must match
            summary = {key: value for key, value in summary.items() if not key.startswith("grad_cos/")}
            assert rank0[name]["evals"][step].keys() == summary.keys()
            for key, value in summary.items():
                assert rank0[name]["evals"][step][key] == pytest.approx(value, abs=1e-3), (name, step, key)


@pytest.mark.parametrize("loss", sorted(OTHER_LOSSES))
def test_other_losses_follow_the_ddp_curve(runs, loss):
    rank0, _, _ = runs
    ddp, zero = rank0[f"{loss}-ddp"]["history"], rank0[f"{loss}-{OTHER_LOSSES[loss]}"]["history"]
    assert len(ddp) == 3 and ddp[-1]["train/loss"] != ddp[0]["train/loss"]
    for key in ("train/loss", "train/lr", "train/grad_norm"):
        assert _max_difference(ddp, zero, key) <= LOSS_TOLERANCE * (1 + abs(ddp[0][key])), key


def test_deepspeed_is_imported_only_by_deepspeed_runs(runs):
    rank0, rank1, _ = runs
    assert not rank0["ddp"]["deepspeed_imported"] and not rank1["ddp"]["deepspeed_imported"]


def test_zero3_partitions_the_policy_not_the_reference(runs):
    rank0, rank1, _ = runs
    for result in (rank0["zero3"], rank1["zero3"]):
        # between forwards every rank holds only its slice of the weights, so any forward is a collective
        assert {"gpt_neox.embed_in.weight", "gpt_neox.layers.0.attention.query_key_value.weight",
                "lm_head.weight"} <= set(result["partitioned"])
        assert result["reference_plain"]


def test_zero3_full_weights_reach_the_actors_and_the_saved_model(runs):
    from transformers import AutoModelForCausalLM

    rank0, _, out = runs
    for name in ("zero2", "zero3"):
        weights = rank0[name]["weights"]
        assert _max_weight_difference(weights, rank0[name]["pushed"]) == 0.0
        saved = AutoModelForCausalLM.from_pretrained(out / f"{name}-model").state_dict()
        assert _max_weight_difference(weights, {k: saved[k] for k in weights}) == 0.0


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_resumed_run_continues_the_same_curve(runs, name):
    rank0, rank1, _ = runs
    resumed, full = rank0[f"{name}-resumed"], rank0[name]
    assert resumed["start_step"] == SAVE_AT and not rank0[name].get("file_clash")
    tail = [row for row in full["history"] if row["step"] > SAVE_AT]
    for key in CURVE_KEYS + ("dpo/reward_accuracy",):
        assert _max_difference(tail, resumed["history"], key) == 0.0, key   # the same math on the same state
    assert _max_weight_difference(full["weights"], resumed["weights"]) == 0.0
    assert resumed["evals"][STEPS] == full["evals"][STEPS]
    assert rank1[f"{name}-resumed"]["start_step"] == SAVE_AT


@pytest.fixture(scope="module")
def zero3_sweep(tmp_path_factory):
    """A 1-trial DPO sweep through Ray with ZeRO-3 (the module's only Ray start-up), whose rank 0 is
    killed once at step 4: Ray Train restarts both workers from the merged step-2 checkpoint."""
    from infra.tracking import Tracker, default_tracking_uri
    from trainers.runs.train_loop import FAULT_MARKER_ENV, FAULT_STEP_ENV

    root = tmp_path_factory.mktemp("zero3-sweep")
    (root / "faults").mkdir()
    settings = TrainConfig.from_dict(_config("unused", strategy="deepspeed", zero_stage=3))
    flags = [f"--{name.replace('_', '-')}={getattr(settings, name)}" for name in
             ("strategy", "zero_stage", "max_train_pairs", "micro_batch_size", "grad_accum_steps", "num_probe_prompts",
              "greedy_max_tokens", "lr", "warmup_steps", "max_grad_norm", "num_workers")]
    command = [sys.executable, str(Path(__file__).resolve().parents[3] / "sweeps" / "dpo_beta.py"),
               "--name", "zero3", "--experiment-name", "zero3", "--betas", "0.1", "--sft-steps", "0",
               "--share-reference-logps", "false", "--max-steps", str(SAVE_AT), "--eval-every", "2",
               "--checkpoint-every", "2", "--report-every", "1", "--num-cpus", "2",
               "--tracking-uri", default_tracking_uri(root), "--storage-path", str(root / "runs"), *flags]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", FAULT_STEP_ENV: "4", FAULT_MARKER_ENV: str(root / "faults")}
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    print(f"\nZeRO-3 sweep through Ray: {time.perf_counter() - started:.1f}s")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tracker = Tracker(default_tracking_uri(root))
    experiment = tracker.client.get_experiment_by_name("zero3")
    trials = [r for r in tracker.client.search_runs([experiment.experiment_id]) if r.data.tags.get("stage") == "sweep"]
    return tracker, trials, root


@pytest.mark.ray
def test_zero3_sweep_through_ray_logs_and_resumes(zero3_sweep, runs):
    from sweeps.driver import CATEGORIES

    tracker, trials, root = zero3_sweep
    assert len(trials) == 1 and trials[0].info.status == "FINISHED"
    run = trials[0]
    assert run.data.params["strategy"] == "deepspeed" and run.data.params["zero_stage"] == "3"
    assert len(list((root / "faults").iterdir())) == 1 and run.data.tags["resumed_from_step"] == "2"
    # Ray Train merged both ranks' shards into each checkpoint folder
    folders = sorted(p for p in root.glob("runs/zero3/train/*/checkpoint_*") if p.is_dir())
    assert folders
    for folder in folders:
        assert {p.name for p in (folder / "zero").glob("*optim_states.pt")} == {
            f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)}, folder
    loss = tracker.metric_history(run.info.run_id, "train/loss")
    assert [s for s, _ in loss] == list(range(1, SAVE_AT + 1))
    # the same curve as the uninterrupted 2-process run (steps 3-4 come from the restored shards)
    expected = [row["train/loss"] for row in runs[0]["zero3"]["history"][:SAVE_AT]]
    assert [v for _, v in loss] == pytest.approx(expected, abs=LOSS_TOLERANCE)
    for category in CATEGORIES:
        assert [s for s, _ in tracker.metric_history(run.info.run_id, f"logp/{category}")] == [0, 2, 4], category
    assert Path(run.data.tags["checkpoint_dir"], "config.json").is_file()


def test_config_validation():
    assert TrainConfig().strategy == "ddp" and TrainConfig().zero_stage == 2
    assert TrainConfig(strategy="deepspeed", zero_stage=3).zero_stage == 3
    with pytest.raises(ValueError, match="--strategy must be one of ddp, deepspeed; got 'fsdp'"):
        TrainConfig(strategy="fsdp")
    with pytest.raises(ValueError, match="--zero-stage must be one of 1, 2, 3; got 4"):
        TrainConfig(strategy="deepspeed", zero_stage=4)
    with pytest.raises(ValueError, match="does not support loss 'ppo' yet"):
        TrainConfig(strategy="deepspeed", loss="ppo")
    TrainConfig(strategy="ddp", loss="ppo")


def test_flags_reach_the_config(capsys):
    from sweeps.config import parse_config

    config = parse_config(["--strategy", "deepspeed", "--zero-stage", "3"], "test")
    assert config.train.strategy == "deepspeed" and config.train.zero_stage == 3
    with pytest.raises(SystemExit):
        parse_config(["--zero-stage", "5"], "test")
    assert "invalid choice" in capsys.readouterr().err


def test_missing_deepspeed_says_how_to_install(monkeypatch):
    from trainers.runs import deepspeed_strategy

    monkeypatch.setitem(sys.modules, "deepspeed", None)   # makes `import deepspeed` fail
    monkeypatch.setenv("DS_ACCELERATOR", "unset-by-test")
    with pytest.raises(ImportError, match=r"pip install -e '\.\[deepspeed\]'"):
        deepspeed_strategy.import_deepspeed(use_gpu=False)
    assert os.environ["DS_ACCELERATOR"] == "cpu"   # set before the import was tried


def test_deepspeed_config_mirrors_the_train_config():
    from trainers.runs.deepspeed_strategy import deepspeed_config

    config = deepspeed_config(TrainConfig(strategy="deepspeed", zero_stage=3, micro_batch_size=6, grad_accum_steps=4,
                                          max_grad_norm=0.5))
    assert config["train_micro_batch_size_per_gpu"] == 6 and config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 0.5 and config["zero_optimization"] == {"stage": 3}
    assert not config["fp16"]["enabled"] and not config["bf16"]["enabled"]
    assert "optimizer" not in config and "scheduler" not in config   # ours are passed in: nothing to compile
