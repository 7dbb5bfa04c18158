"""A DPO beta sweep, three ways: shared reference log-probs vs a reference forward in every trial, the
sweep's orchestration vs the same trials in one plain process, and (if installed) our DPO step vs TRL.

    python benchmarks/dpo_sweep.py                      # defaults: 4 betas x 40 steps, tiny-pythia-1m, ~10 min on 2 cores
    python benchmarks/dpo_sweep.py --steps 4 --betas 0.1 0.5 --skip-trl   # a quick smoke run

Everything lives in one temporary folder (one storage path, so the SFT warm-up is trained once) on one
local Ray instance:

1. A priming sweep (one 1-step trial, per-trial reference) trains and caches the SFT warm-up and starts
   Ray's worker pool, so neither measured sweep pays for them.
2. The same sweep twice through `sweeps.driver.run_sweep`, each with its own MLflow SQLite store:
   `share_reference_logps=True` (the driver computes the reference log-probs once, as a Ray task) and
   `False` (each trial keeps a reference model and runs it every step). The driver's stages are timed by
   wrapping `run_stage` / `shared_reference_logps` / `start_ray`. `speedup` = per-trial DPO stage /
   (shared reference computation + shared DPO stage). `max_abs_diff` = the largest |difference| between
   the two sweeps of any final metric (`logp/*`, `logp_tok/*`, `dpo/*`, `train/loss` at the last step) of
   any trial, read back from MLflow.
3. The shared sweep's trials once more, one after another in this process with `PolicyTrainer` (world
   size 1, micro batch = the sweep's micro batch x workers, the same evaluation schedule, the shared
   reference log-probs, the cached warm-up). `orchestration_overhead` = the sweep's DPO stage / the sum
   of these plain runs.
4. `benchmarks/trl_dpo_compare.py`'s `compare()` if that script exists and TRL imports.

Writes benchmarks/results/dpo_sweep.json and prints a table.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

# before Ray is imported or started: every Ray service binds 127.0.0.1
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

import sweeps.driver as driver  # noqa: E402
from sweeps.config import SweepConfig  # noqa: E402
from infra.tracking import Tracker, default_tracking_uri  # noqa: E402
from trainers.config import TrainConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "dpo_sweep.json"
TRL_SCRIPT = Path(__file__).resolve().parent / "trl_dpo_compare.py"
COMPARED_PREFIXES = ("logp/", "logp_tok/", "dpo/")
COMPARED_KEYS = ("train/loss",)
TOLERANCE = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5])
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--model", default="tiny-pythia-1m")
    parser.add_argument("--steps", type=int, default=40, help="DPO steps per trial")
    parser.add_argument("--eval-every", type=int, default=20, help="probe evaluation every N steps (and at 0 and the last)")
    parser.add_argument("--probe-prompts", type=int, default=16)
    parser.add_argument("--greedy-max-tokens", type=int, default=48)
    parser.add_argument("--max-train-pairs", type=int, default=800)
    parser.add_argument("--sft-steps", type=int, default=40, help="steps of the shared SFT warm-up (trained once, not timed)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="pairs per worker per step in the sweep")
    parser.add_argument("--num-workers", type=int, default=2, help="Ray Train workers per trial")
    parser.add_argument("--max-concurrent-trials", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all cores)")
    parser.add_argument("--baseline-threads", type=int, default=1,
                        help="torch threads of the plain-process baseline (1: what every Ray worker uses)")
    parser.add_argument("--skip-trl", action="store_true", help="do not run the TRL comparison")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (MLflow stores, checkpoints)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def sweep_config(args, root: Path, name: str, share: bool, **train_overrides) -> SweepConfig:
    train = TrainConfig(model=args.model, lr=args.lr, max_steps=args.steps, eval_every=args.eval_every,
                        num_probe_prompts=args.probe_prompts, greedy_max_tokens=args.greedy_max_tokens,
                        max_train_pairs=args.max_train_pairs, micro_batch_size=args.micro_batch_size,
                        num_workers=args.num_workers)
    train = replace(train, **train_overrides)
    store = root / f"mlflow-{name}"
    store.mkdir(parents=True, exist_ok=True)
    return SweepConfig(name=name, betas=list(args.betas), lrs=[args.lr], sft_steps=args.sft_steps,
                       share_reference_logps=share, tracking_uri=default_tracking_uri(store),
                       experiment_name="dpo-sweep-benchmark", storage_path=str(root / "runs"),
                       num_cpus=args.num_cpus, max_concurrent_trials=args.max_concurrent_trials, train=train)


class StageTimer:
    """Wall time of the driver's stages, by wrapping its module-level functions while a sweep runs."""

    # names the driver looks up in its own module when `run_sweep` runs (whichever of them it has)
    WRAPPED = ("start_ray", "run_stage", "shared_sft_warmup", "shared_sft_warmups", "shared_reference_logps")

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def installed(self):
        originals = {name: getattr(driver, name) for name in self.WRAPPED if hasattr(driver, name)}
        if "run_stage" not in originals:
            raise RuntimeError("sweeps.driver has no run_stage to time; update StageTimer.WRAPPED")

        def timed(name, function):
            def wrapper(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    label = f"run_stage:{args[0]}" if name == "run_stage" else name
                    self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - started
            return wrapper

        for name, function in originals.items():
            setattr(driver, name, timed(name, function))
        try:
            yield self
        finally:
            for name, function in originals.items():
                setattr(driver, name, function)


def run_timed_sweep(config: SweepConfig) -> dict:
    from ray import tune

    timer = StageTimer()
    started = time.perf_counter()
    with timer.installed():
        outcome = driver.run_sweep(config, {"beta": tune.grid_search(config.betas), "lr": tune.grid_search(config.sweep_lrs())})
    total = time.perf_counter() - started
    if outcome.failed_trials:
        raise RuntimeError(f"sweep {config.name}: failed trials {outcome.failed_trials}")
    return {"outcome": outcome, "run_sweep_s": total, "stages_s": dict(timer.seconds)}


def final_metrics(tracker: Tracker, run_id: str, last_step: int) -> dict[str, float]:
    """Every compared metric of a run at its last step, read back from MLflow."""
    keys = [k for k in tracker.run(run_id).data.metrics if k.startswith(COMPARED_PREFIXES) or k in COMPARED_KEYS]
    values = {}
    for key in keys:
        at_last = [v for s, v in tracker.metric_history(run_id, key) if s == last_step]
        if at_last:
            values[key] = at_last[-1]
    return values


def sweep_final_metrics(outcome, last_step: int) -> dict[float, dict[str, float]]:
    tracker = Tracker(outcome.tracking_uri)
    return {row["beta"]: final_metrics(tracker, row["run_id"], last_step) for row in outcome.summary}


def compare_metrics(a: dict[float, dict[str, float]], b: dict[float, dict[str, float]]) -> dict:
    """max |a - b| over every (trial, metric) both have, per metric key, and what one side lacks."""
    per_key: dict[str, float] = {}
    missing = []
    for beta in sorted(set(a) | set(b)):
        left, right = a.get(beta, {}), b.get(beta, {})
        missing += [f"beta={beta}:{k}" for k in sorted(set(left) ^ set(right))]
        for key in set(left) & set(right):
            per_key[key] = max(per_key.get(key, 0.0), abs(left[key] - right[key]))
    worst = max(per_key.items(), key=lambda kv: kv[1]) if per_key else (None, None)
    return {"max_abs_diff": worst[1], "worst_metric": worst[0], "metrics_compared": len(per_key),
            "trials_compared": len(set(a) & set(b)), "per_metric": dict(sorted(per_key.items())), "missing": missing}


# the spans of one trial, in order, and what each covers (sequential: they add up to the trial's wall time
# apart from "unaccounted"); timestamps come from the trial process and from rank 0 of its workers
SPANS = {
    "trial_process_start_s": "trial process created, or in a process Tune reused the previous trial's return -> "
                             "run_trial entered (process start, sweeps.trial imports, Tune's set-up)",
    "mlflow_run_setup_s": "run_trial entered -> TorchTrainer built (MLflow child run, params, config and manifest)",
    "worker_group_start_s": "fit() called -> worker loop entered (Train controller, worker processes, train_loop "
                            "imports, torch.distributed set-up)",
    "model_data_reference_load_s": "PolicyTrainer built: model + tokenizer from the SFT warm-up folder, training "
                                   "pairs tokenized, reference log-prob file + content key, probe set",
    "prepare_s": "checkpoint restore (none here), DDP wrap, nodes gathered",
    "first_evaluation_s": "the step-0 probe evaluation",
    "steps_s": "train_step calls (forward, backward, all-reduce, optimizer)",
    "later_evaluations_s": "probe evaluations after step 0",
    "reports_s": "ray.train.report round trips without a checkpoint (all but the final report)",
    "checkpoints_s": "save_checkpoint + the report handing it to Train (all but the final report)",
    "final_model_save_s": "save_pretrained of the final model",
    "final_report_and_shutdown_s": "final report sent -> fit() returned (its checkpoint, worker group shutdown)",
    "trial_finish_s": "fit() returned -> figure logged (MLflow reads, category-curve figure)",
}
OVERLAPPING = {
    "worker_imports_s": "train_loop module imports inside worker_group_start_s (0-ish: imported earlier in a reused process)",
    "worker_process_age_at_loop_s": "worker process created -> loop entered",
    "mlflow_writes_s": "the Train controller's MLflow writes (metrics, probe CSV/npz artifacts), concurrent with the worker",
}


def time_breakdown(trial: dict, worker: dict) -> dict:
    """Spans of one trial from its two timing tags (trial process, rank 0 worker); seconds."""
    spans = {
        "trial_process_start_s": trial["started_at"] - trial["process_started_at"] if trial.get("process_started_at") is not None else None,
        "mlflow_run_setup_s": trial["fit_started_at"] - trial["started_at"],
        "worker_group_start_s": worker["loop_started_at"] - trial["fit_started_at"],
        "model_data_reference_load_s": worker["trainer_built_at"] - worker["loop_started_at"],
        "prepare_s": worker["prepared_at"] - worker["trainer_built_at"],
        # a worker group restarted from a checkpoint (a recovered fault) has no step-0 evaluation
        "first_evaluation_s": (worker["first_eval_done_at"] - worker["prepared_at"]
                               if worker.get("first_eval_done_at") is not None else None),
        "steps_s": worker["steps_s"],
        "later_evaluations_s": worker["evals_s"],
        "reports_s": worker["reports_s"],
        "checkpoints_s": worker["checkpoints_s"],
        "final_model_save_s": worker["final_save_s"],
        "final_report_and_shutdown_s": trial["fit_ended_at"] - worker["sent_at"],
        "trial_finish_s": trial["ended_at"] - trial["fit_ended_at"],
    }
    wall = trial["ended_at"] - trial["started_at"]
    counted = sum(v for k, v in spans.items() if v is not None and k != "trial_process_start_s")
    return {**spans, "wall_s": wall, "unaccounted_s": wall - counted,
            "worker_imports_s": worker["imports_done_at"] - worker["imports_started_at"],
            "worker_process_age_at_loop_s": (worker["loop_started_at"] - worker["process_started_at"]
                                             if worker.get("process_started_at") is not None else None),
            "mlflow_writes_s": worker.get("mlflow_writes_s")}


def trial_breakdown(outcome, stage_s: float) -> dict:
    """Where the sweep's DPO stage went, per trial, from the timing tags each trial and its rank 0 leave."""
    from sweeps.trial import TRIAL_TIMINGS_TAG, WORKER_TIMINGS_TAG

    tracker = Tracker(outcome.tracking_uri)
    trials, starts, ends = [], [], []
    for row in outcome.summary:
        tags = tracker.run(row["run_id"]).data.tags
        trial, worker = json.loads(tags[TRIAL_TIMINGS_TAG]), json.loads(tags[WORKER_TIMINGS_TAG])
        trials.append({"beta": row["beta"], **time_breakdown(trial, worker)})
        starts.append(trial["started_at"])
        ends.append(trial["ended_at"])
    keys = [k for k in trials[0] if k != "beta"]
    totals = {k: sum(t[k] for t in trials if t[k] is not None) for k in keys}
    return {"trials": trials, "sum_over_trials_s": totals, "span_meanings": {**SPANS, **OVERLAPPING},
            "first_trial_start_to_last_trial_end_s": max(ends) - min(starts),
            "tune_outside_trials_s": stage_s - (max(ends) - min(starts))}


def print_breakdown(label: str, breakdown: dict) -> None:
    trials = breakdown["trials"]
    print(f"\n{label}: where each trial's time went (s)")
    print(f"  {'span':<30}" + "".join(f"{'beta=' + format(t['beta'], 'g'):>12}" for t in trials))
    for key in [*SPANS, "unaccounted_s", "wall_s", *OVERLAPPING]:
        cells = "".join(f"{t[key]:>12.1f}" if t[key] is not None else f"{'-':>12}" for t in trials)
        print(f"  {key:<30}{cells}")
    print(f"  Tune outside the trials: {breakdown['tune_outside_trials_s']:.1f} s")


def run_plain(config: SweepConfig, sft_dir: str, reference_dir: str, probe_dir: str, threads: int) -> dict:
    """The sweep's trials one after another in this process: PolicyTrainer with world size 1."""
    from trainers.runs.policy_trainer import PolicyTrainer

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    trials, metrics = [], {}
    try:
        for beta in config.betas:
            started = time.perf_counter()
            train = replace(config.train, beta=beta, lr=config.sweep_lrs()[0], init_checkpoint=sft_dir,
                            reference_logps_dir=reference_dir, probe_set_dir=probe_dir, num_workers=1,
                            micro_batch_size=config.train.micro_batch_size * config.train.num_workers)
            trainer = PolicyTrainer(train)
            trainer.prepare()
            setup_s = time.perf_counter() - started
            eval_s, step_s, final = 0.0, 0.0, {}
            t = time.perf_counter()
            evaluated, _ = trainer.evaluate()
            eval_s += time.perf_counter() - t
            while trainer.step < train.max_steps:
                t = time.perf_counter()
                final = trainer.train_step()
                step_s += time.perf_counter() - t
                if trainer.step % train.eval_every == 0 or trainer.step == train.max_steps:
                    t = time.perf_counter()
                    evaluated, _ = trainer.evaluate()
                    eval_s += time.perf_counter() - t
            final.update(evaluated)
            metrics[beta] = {k: v for k, v in final.items() if k.startswith(COMPARED_PREFIXES) or k in COMPARED_KEYS}
            trials.append({"beta": beta, "wall_s": time.perf_counter() - started, "setup_s": setup_s,
                           "eval_s": eval_s, "train_steps_s": step_s, "mean_step_s": step_s / train.max_steps})
    finally:
        torch.set_num_threads(previous_threads)
    return {"trials": trials, "total_s": sum(t["wall_s"] for t in trials), "final_metrics": metrics,
            "torch_threads": threads}


def reference_logps_in_process(config: SweepConfig, sft_dir: str, shared_dir: str, threads: int) -> dict:
    """The shared reference computation timed by itself, and how much a batch's padding moves the numbers:
    per-trial references score each step's micro-batch, the shared pass batches of 2 x micro batch."""
    from trainers.data.collate import load_training_pairs
    from trainers.model.factory import load_model_and_tokenizer
    from trainers.runs.reference_logps import (
        ReferenceLogps,
        compute_reference_logps,
        reference_key,
        reference_logps_path,
        visited_pair_indices,
    )

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        train = replace(config.train, init_checkpoint=sft_dir)
        started = time.perf_counter()
        model, tokenizer = load_model_and_tokenizer(sft_dir, seed=train.seed)
        _, pairs, _ = load_training_pairs(train, tokenizer)
        load_s = time.perf_counter() - started
        t = time.perf_counter()
        key = reference_key(model, pairs)
        key_s = time.perf_counter() - t
        shared_batch = 2 * train.micro_batch_size
        # the pairs the sweep's schedule visits: all the shared pass scores (sweeps.stages)
        visited = visited_pair_indices(len(pairs), train.micro_batch_size, train.num_workers, train.grad_accum_steps,
                                       train.seed, train.max_steps)
        scored = [pairs[i] for i in visited]
        t = time.perf_counter()
        chosen, rejected = compute_reference_logps(model, scored, tokenizer.pad_token_id, batch_size=shared_batch)
        compute_s = time.perf_counter() - t
        small_chosen, small_rejected = compute_reference_logps(model, scored, tokenizer.pad_token_id, batch_size=train.micro_batch_size)
        stored_chosen, stored_rejected = ReferenceLogps.load(reference_logps_path(shared_dir, key), key, len(pairs)).pick(visited)
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "pairs": len(pairs), "pairs_scored": len(visited), "torch_threads": threads, "load_model_and_tokenize_s": load_s, "content_key_s": key_s,
        "forward_s": compute_s, "batch_size": shared_batch,
        "vs_ray_task_file_max_abs_diff": float(max(np.abs(stored_chosen - chosen).max(), np.abs(stored_rejected - rejected).max())),
        f"batch{shared_batch}_vs_batch{train.micro_batch_size}_max_abs_diff":
            float(max(np.abs(small_chosen - chosen).max(), np.abs(small_rejected - rejected).max())),
        "mean_abs_logp": float(np.abs(np.concatenate([chosen, rejected])).mean()),
    }


def trl_numbers(skip: bool) -> dict:
    if skip:
        return {"trl_throughput_ratio": None, "trl_max_abs_diff": None, "trl_reason": "skipped (--skip-trl)"}
    if not TRL_SCRIPT.exists():
        return {"trl_throughput_ratio": None, "trl_max_abs_diff": None, "trl_reason": f"{TRL_SCRIPT.name} not found"}
    try:
        import trl  # noqa: F401
    except ImportError as error:
        return {"trl_throughput_ratio": None, "trl_max_abs_diff": None,
                "trl_reason": f"TRL is not installed (pip install -e '.[bench]'): {error}"}
    try:
        spec = importlib.util.spec_from_file_location("trl_dpo_compare", TRL_SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        started = time.perf_counter()
        report = module.compare()
        seconds = time.perf_counter() - started
    except BaseException as error:  # noqa: BLE001 - includes the SystemExit its TRL import guard raises
        if isinstance(error, KeyboardInterrupt):
            raise
        return {"trl_throughput_ratio": None, "trl_max_abs_diff": None,
                "trl_reason": f"compare() failed: {type(error).__name__}: {error}",
                "trl_traceback": traceback.format_exc(limit=5)}
    return {"trl_throughput_ratio": report.get("trl_throughput_ratio"), "trl_max_abs_diff": report.get("trl_max_abs_diff"),
            "trl_reason": None, "trl_compare_s": seconds,
            "trl_settings": report.get("settings"), "trl_version": report.get("versions", {}).get("trl")}


def versions() -> dict:
    import mlflow
    import ray
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
             "mlflow": mlflow.__version__, "transformers": transformers.__version__}
    with contextlib.suppress(ImportError):
        import trl
        found["trl"] = trl.__version__
    return found


def print_table(report: dict) -> None:
    t, s = report["timings_s"], report["settings"]
    print(f"\nDPO beta sweep: {len(s['betas'])} betas x {s['steps']} steps, {s['model']}, {s['num_workers']} workers x "
          f"{s['micro_batch_size']} pairs/step, eval every {s['eval_every']} ({s['probe_prompts']} prompts)")
    rows = [
        ("shared reference log-probs (Ray task)", t["shared"]["reference_logps_s"]),
        ("shared: DPO stage", t["shared"]["dpo_stage_s"]),
        ("shared: reference + DPO stage", t["shared"]["reference_plus_dpo_stage_s"]),
        ("per-trial reference: DPO stage", t["per_trial"]["dpo_stage_s"]),
        ("plain process, trials in series", t["plain_process"]["total_s"]),
        ("(untimed) SFT warm-up priming sweep", t["priming_sweep_s"]),
    ]
    for label, value in rows:
        print(f"  {label:<40}{value:>9.1f} s")
    print(f"  speedup (per-trial / shared)            {report['speedup']:>9.2f}x")
    print(f"  max |diff| of final metrics             {report['max_abs_diff']:>9.2e}  "
          f"({'within' if report['max_abs_diff_within_tolerance'] else 'OVER'} {TOLERANCE:g}; worst {report['metric_comparison']['worst_metric']})")
    print(f"  orchestration overhead (sweep / plain)  {report['orchestration_overhead']:>9.2f}x")
    ratio, diff = report["trl_throughput_ratio"], report["trl_max_abs_diff"]
    if ratio is None:
        print(f"  TRL: not measured ({report['trl_reason']})")
    else:
        print(f"  TRL: throughput ours/TRL {ratio:.2f}x, max |diff| {diff:.2e}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    import ray

    root = Path(tempfile.mkdtemp(prefix="probesweep-dpo-bench-"))
    print(f"working folder: {root}", flush=True)
    try:
        # 1. prime: the SFT warm-up (its cache key ignores max_steps and beta) and Ray's worker pool
        started = time.perf_counter()
        ray_timer = StageTimer()
        priming = sweep_config(args, root, "priming", share=False, max_steps=1, eval_every=1)
        priming = replace(priming, betas=[args.betas[0]])
        with ray_timer.installed():
            from ray import tune
            primed = driver.run_sweep(priming, {"beta": tune.grid_search(priming.betas), "lr": tune.grid_search(priming.sweep_lrs())})
        priming_s = time.perf_counter() - started
        if primed.failed_trials:
            raise RuntimeError(f"the priming sweep failed: {primed.failed_trials}")
        sft_dir = Tracker(primed.tracking_uri).run(primed.parent_run_id).data.tags["sft_warmup_dir"]

        # 2. the same sweep with a shared reference and with one per trial (warm-up cached, Ray running)
        shared_config = sweep_config(args, root, "shared", share=True)
        per_trial_config = sweep_config(args, root, "per-trial", share=False)
        print("\n=== sweep with shared reference log-probs ===", flush=True)
        shared = run_timed_sweep(shared_config)
        print("\n=== sweep with a reference forward in every trial ===", flush=True)
        per_trial = run_timed_sweep(per_trial_config)
        ray.shutdown()

        shared_stage = shared["stages_s"]["run_stage:sweep"]
        shared_reference = shared["stages_s"].get("shared_reference_logps", 0.0)
        per_trial_stage = per_trial["stages_s"]["run_stage:sweep"]
        comparison = compare_metrics(sweep_final_metrics(shared["outcome"], args.steps),
                                     sweep_final_metrics(per_trial["outcome"], args.steps))

        # 3. the same trials in this process, in series
        shared_tracker = Tracker(shared["outcome"].tracking_uri)
        shared_params = shared_tracker.run(shared["outcome"].trial_run_ids[0]).data.params
        reference_dir, probe_dir = shared_params["reference_logps_dir"], shared_params["probe_set_dir"]
        print(f"\n=== the same {len(args.betas)} trials in this process, one after another "
              f"({args.baseline_threads} torch thread(s)) ===", flush=True)
        plain = run_plain(shared_config, sft_dir, reference_dir, probe_dir, args.baseline_threads)
        plain_vs_sweep = compare_metrics(plain.pop("final_metrics"), sweep_final_metrics(shared["outcome"], args.steps))
        reference_pieces = reference_logps_in_process(shared_config, sft_dir, reference_dir, args.baseline_threads)

        # 4. TRL
        print("\n=== TRL comparison ===", flush=True)
        trl = trl_numbers(args.skip_trl)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    speedup = per_trial_stage / (shared_reference + shared_stage)
    report = {
        "speedup": speedup,
        "speedup_dpo_stage_only": per_trial_stage / shared_stage,
        "max_abs_diff": comparison["max_abs_diff"],
        "max_abs_diff_tolerance": TOLERANCE,
        "max_abs_diff_within_tolerance": comparison["max_abs_diff"] is not None and comparison["max_abs_diff"] <= TOLERANCE,
        "orchestration_overhead": shared_stage / plain["total_s"],
        "trl_throughput_ratio": trl.pop("trl_throughput_ratio"),
        "trl_max_abs_diff": trl.pop("trl_max_abs_diff"),
        **trl,
        "timings_s": {
            "priming_sweep_s": priming_s,
            "ray_start_s": ray_timer.seconds.get("start_ray"),
            "sft_warmup_stage_s": ray_timer.seconds.get("run_stage:sft-warmup"),
            "shared": {"reference_logps_s": shared_reference, "dpo_stage_s": shared_stage,
                       "reference_plus_dpo_stage_s": shared_reference + shared_stage,
                       "run_sweep_s": shared["run_sweep_s"], "stages_s": shared["stages_s"],
                       "breakdown": trial_breakdown(shared["outcome"], shared_stage)},
            "per_trial": {"dpo_stage_s": per_trial_stage, "run_sweep_s": per_trial["run_sweep_s"],
                          "stages_s": per_trial["stages_s"],
                          "breakdown": trial_breakdown(per_trial["outcome"], per_trial_stage)},
            "plain_process": plain,
            "reference_logps_in_process": reference_pieces,
        },
        "metric_comparison": comparison,
        "plain_process_vs_shared_sweep_metrics": {k: v for k, v in plain_vs_sweep.items() if k != "per_metric"},
        "settings": {
            "model": args.model, "betas": list(args.betas), "lr": args.lr, "steps": args.steps, "eval_every": args.eval_every,
            "probe_prompts": args.probe_prompts, "greedy_max_tokens": args.greedy_max_tokens,
            "max_train_pairs": args.max_train_pairs, "sft_steps": args.sft_steps,
            "micro_batch_size": args.micro_batch_size, "num_workers": args.num_workers,
            "global_batch_pairs": args.micro_batch_size * args.num_workers,
            "cpus_per_worker": shared_config.train.cpus_per_worker, "max_concurrent_trials": args.max_concurrent_trials,
            "ray_num_cpus": args.num_cpus or os.cpu_count(), "checkpoint_every": shared_config.train.checkpoint_every,
            "report_every": shared_config.train.report_every, "train_poll_interval_s": shared_config.train_poll_interval_s,
            "baseline_torch_threads": args.baseline_threads,
        },
        "versions": versions(),
        "machine": {"arch": platform.machine(), "cpu_count": os.cpu_count()},
        "notes": [
            "All timings come from one run on one machine; both sweeps share one local Ray instance and one storage "
            "path. A priming sweep (one 1-step trial) trains and caches the SFT warm-up first and is not timed.",
            "speedup = per-trial DPO stage / (shared reference log-prob Ray task + shared DPO stage); the DPO stage "
            "is the driver's run_stage('sweep') (Tune + Train + MLflow for every trial), measured by wrapping it.",
            "max_abs_diff compares every logp/*, logp_tok/*, dpo/* and train/loss of every trial at the last step, "
            "read back from the two MLflow stores. The shared pass scores pairs in batches of 2 x micro batch, a "
            "per-trial reference scores each worker's micro-batch, so padding differs and float32 sums may differ "
            "in the last bits (see timings_s.reference_logps_in_process).",
            "orchestration_overhead = the shared sweep's DPO stage / the same trials run one after another in this "
            "process (PolicyTrainer, world size 1, micro batch = micro batch x workers, same evaluations, same "
            "shared reference log-probs, same warm-up). The sweep runs up to max_concurrent_trials trials at once, "
            "each with num_workers DDP workers of 1 torch thread, on all cores; the baseline runs the trials "
            f"serially in one process with {args.baseline_threads} torch thread(s). So the ratio mixes "
            "orchestration cost (Ray Train start-up per trial, reports, checkpoints, MLflow writes, DDP gloo "
            "all-reduce) with the gain of using every core at once.",
            "The shared reference pass scores only the pairs the trials' schedule visits (same seed, batch shape "
            "and steps; see timings_s.reference_logps_in_process.pairs_scored), not every training pair.",
            "Trials run at once only as far as their busy threads fit Ray's CPUs (sweeps.search.concurrent_trials): "
            "--max-concurrent-trials is an upper bound; each worker runs max(1, floor(cpus_per_worker)) threads.",
            "timings_s.*.breakdown: per-trial spans from timestamps the trial process and its rank 0 worker tag on "
            "the MLflow run (span_meanings says what each covers); mlflow_writes_s overlaps the worker's spans.",
            "The baseline does not write checkpoints or MLflow records; the sweep does (a checkpoint every "
            "checkpoint_every steps, the final model, per-evaluation CSV artifacts, a figure per trial).",
        ],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print_breakdown("shared reference sweep", report["timings_s"]["shared"]["breakdown"])
    print_breakdown("per-trial reference sweep", report["timings_s"]["per_trial"]["breakdown"])
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
