"""Our DPO step against TRL's `DPOTrainer`: the same tiny model, the same batch, the same optimizer.

    pip install -e ".[bench]"          # TRL is a benchmark-only dependency
    python benchmarks/trl_dpo_compare.py   # defaults: tiny-pythia-1m, 8 built-in pairs, under a minute on 2 cores

Builds tiny-pythia-1m (seed 0, float32) as four identical copies (policy and reference for each side)
and takes the first 8 built-in training pairs as one fixed batch, beta 0.1.

* Agreement, before any update: our `compute_loss` (and `forward_logps`, the function it uses) against
  TRL's `DPOTrainer.compute_loss` and `DPOTrainer.compute_ref_log_probs` (TRL's own per-example
  summed log-probs, called with the policy), on the batch TRL's own tokenizer and collator built.
  The token ids TRL produced are checked against ours first.
* Throughput: `warmup + steps` optimizer steps on that batch each way (AdamW, constant lr, the same
  gradient clipping), timed after the warm-up. Ours is `compute_loss` + backward + clip + step; TRL's
  is its `Trainer.train()` loop, timed from the end of one step to the end of the next with a
  callback (so batch fetching/collation, which our `compute_loss` also does, is included, and TRL's
  set-up and tokenization are not).

At step 0 the policy equals the reference, so both losses are exactly log 2; the loss is therefore
also compared on TRL's policy after training (both codes, the same reference weights).

Where TRL's extra time goes (CPU): its fused LM head (`trl.kernels.ChunkedLogProbFunction`) runs as
torch ops without Triton, so it scores every position, folds in extra logging statistics (entropy,
mean logit, top-1), and recomputes the logits tiles in backward. That saves memory on a large
vocabulary on a GPU; on a 2,048-token vocabulary on a CPU it costs time.

Writes benchmarks/results/trl_dpo_compare.json. `compare(...)` returns the same dict for other scripts.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path

# no hub is reachable: keep TRL's telemetry ping and any hub lookup from trying
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from trainers.data.collate import (  # noqa: E402
    TokenizedPair,
    collate_preference_batch,
    encode_prompt,
    encode_response,
    tokenize_pair,
)
from trainers.config import TrainConfig  # noqa: E402
from trainers.model.logprobs import IGNORE_INDEX  # noqa: E402
from trainers.model.factory import load_model_and_tokenizer  # noqa: E402
from trainers.model.objectives import compute_loss, forward_logps  # noqa: E402
from trainers.data.builtin import builtin_pairs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "trl_dpo_compare.json"
LOSS_TOLERANCE, LOGP_TOLERANCE = 1e-5, 1e-4


@dataclass
class Settings:
    model: str = "tiny-pythia-1m"
    num_pairs: int = 8
    beta: float = 0.1
    lr: float = 1e-4
    warmup: int = 2
    steps: int = 10
    max_grad_norm: float = 1.0           # clipping in both loops, as our PolicyTrainer does; 0 disables
    max_prompt_tokens: int = 160         # TrainConfig defaults
    max_response_tokens: int = 64
    threads: int = 1
    seed: int = 0


def _import_trl():
    try:
        import trl
        from trl import DPOConfig, DPOTrainer
    except ImportError as error:  # TRL is not a project dependency, only of this benchmark
        raise SystemExit(f"this benchmark needs TRL: pip install -e '.[bench]' ({error})") from None
    return trl, DPOConfig, DPOTrainer


def trl_config_fields(s: Settings, output_dir: str, DPOConfig=None) -> dict:
    """DPOConfig fields that make TRL do what our step does (and nothing else)."""
    # TRL defaults to gradient checkpointing, our step does not recompute activations; newer transformers calls it
    # `activation_checkpointing` (the old name still works, with a FutureWarning)
    names = {f.name for f in dataclass_fields(DPOConfig)} if DPOConfig is not None else set()
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return dict(
        output_dir=output_dir,
        # model / precision: float32 on CPU (TRL's default bf16=True is mixed precision, slow on CPU)
        bf16=False, fp16=False, use_cpu=True,
        **{checkpointing: False},
        disable_dropout=True,                  # the tiny model has dropout 0 anyway
        # data: the same batch every step, in order, no multiprocessing
        per_device_train_batch_size=s.num_pairs, gradient_accumulation_steps=1,
        train_sampling_strategy="sequential", dataloader_num_workers=0, dataloader_pin_memory=False,
        max_length=s.max_prompt_tokens + s.max_response_tokens, truncation_mode="keep_start",
        padding_free=False, pad_to_multiple_of=None,
        # objective: plain sigmoid DPO, summed log-probs, a live reference model
        loss_type=["sigmoid"], beta=s.beta, label_smoothing=0.0, ld_alpha=None, use_weighting=False,
        f_divergence_type="reverse_kl", precompute_ref_log_probs=False, sync_ref_model=False,
        # optimisation: torch AdamW (not the fused default), constant lr, our clipping
        optim="adamw_torch", learning_rate=s.lr, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=s.max_grad_norm,
        max_steps=s.warmup + s.steps, seed=s.seed,
        # nothing else: no logging, evaluation, saving, reporting or progress bars
        logging_strategy="no", eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
    )


def _step_timer_callback():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """perf_counter at each optimizer step's begin and end; torch threads seen during training."""

        def __init__(self):
            self.begin, self.end, self.threads = [], [], set()

        def on_step_begin(self, args, state, control, **kwargs):
            self.threads.add(torch.get_num_threads())
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.end.append(time.perf_counter())

    return StepTimer()


def _batch_tokens(batch: dict) -> int:
    """Non-pad tokens of the chosen and rejected sequences (prompt + response) in one step."""
    return int(batch["attention_mask"].sum())


def _our_agreement(config: TrainConfig, policy, reference, pairs: list[TokenizedPair], pad_id: int) -> dict:
    policy.eval()
    n = len(pairs)
    with torch.no_grad():
        loss, metrics = compute_loss(config, policy, pairs, pad_id, reference_model=reference)
        sums, _, _ = forward_logps(policy, collate_preference_batch(pairs, pad_id))  # what compute_loss scores
    policy.train()
    return {"loss": loss.item(), "logp_chosen": sums[:n].tolist(), "logp_rejected": sums[n:].tolist(),
            "metric_logp_chosen": metrics["dpo/logp_chosen"], "metric_logp_rejected": metrics["dpo/logp_rejected"]}


def _trl_agreement(trainer, n: int) -> tuple[dict, dict]:
    """TRL's loss and per-example summed log-probs on the first `n` rows, in order, via its own collator."""
    rows = [trainer.train_dataset[i] for i in range(n)]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    model = trainer.model
    model.eval()
    trainer._metrics["eval"].clear()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)                       # TRL's DPO loss (sigmoid)
        chosen, rejected = trainer.compute_ref_log_probs(model, batch)  # TRL's summed log-probs, per example
    logged = {key: values[-1] for key, values in trainer._metrics["eval"].items()}
    trainer._metrics["eval"].clear()
    model.train()
    return ({"loss": loss.item(), "logp_chosen": chosen.tolist(), "logp_rejected": rejected.tolist(),
             "metric_logp_chosen": logged.get("logps/chosen"), "metric_logp_rejected": logged.get("logps/rejected")},
            batch)


def _abs_diffs(ours: dict, theirs: dict) -> dict:
    return {"loss": abs(ours["loss"] - theirs["loss"]),
            "logp_chosen": max(abs(a - b) for a, b in zip(ours["logp_chosen"], theirs["logp_chosen"])),
            "logp_rejected": max(abs(a - b) for a, b in zip(ours["logp_rejected"], theirs["logp_rejected"]))}


def _within_target(diffs: dict) -> bool:
    return bool(diffs["loss"] <= LOSS_TOLERANCE and max(diffs["logp_chosen"], diffs["logp_rejected"]) <= LOGP_TOLERANCE)


def _logged_vs_mean(result: dict) -> float:
    """|logged batch mean - mean of the per-example values|, chosen and rejected."""
    n = len(result["logp_chosen"])
    return max(abs(sum(result["logp_chosen"]) / n - result["metric_logp_chosen"]),
               abs(sum(result["logp_rejected"]) / n - result["metric_logp_rejected"]))


def _check_tokens(trainer, ours: list[TokenizedPair], our_batch: dict, trl_batch: dict) -> dict:
    """Do TRL's token ids, sequences and scored positions equal ours?"""
    fields_equal = all(
        list(row["prompt_ids"]) == pair.prompt_ids and list(row["chosen_ids"]) == pair.chosen_ids
        and list(row["rejected_ids"]) == pair.rejected_ids
        for row, pair in zip((trainer.train_dataset[i] for i in range(len(ours))), ours))
    same_shape = trl_batch["input_ids"].shape == our_batch["input_ids"].shape
    input_ids_equal = same_shape and torch.equal(trl_batch["input_ids"].cpu(), our_batch["input_ids"])
    attention_equal = same_shape and torch.equal(trl_batch["attention_mask"].cpu(), our_batch["attention_mask"])
    # TRL scores position t where completion_mask[t] == 1; we score where labels[t] != IGNORE_INDEX
    scored_equal = same_shape and torch.equal(trl_batch["completion_mask"].cpu().bool(), our_batch["labels"] != IGNORE_INDEX)
    max_length = trainer.args.max_length
    truncated = max_length is not None and any(
        len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) > max_length
        for row in (trainer.train_dataset[i] for i in range(len(ours))))
    return {"token_ids_equal": bool(fields_equal and input_ids_equal and attention_equal and scored_equal),
            "truncated_trl": bool(truncated),
            "prompt_response_ids_equal": bool(fields_equal), "input_ids_equal": bool(input_ids_equal),
            "attention_mask_equal": bool(attention_equal), "scored_positions_equal": bool(scored_equal)}


def _time_our_steps(config: TrainConfig, policy, reference, pairs, pad_id: int, s: Settings) -> list[float]:
    """Seconds of each optimizer step (warm-up steps included; the caller drops them)."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=s.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    policy.train()
    seconds = []
    for _ in range(s.warmup + s.steps):
        start = time.perf_counter()
        loss, _ = compute_loss(config, policy, pairs, pad_id, reference_model=reference)
        loss.backward()
        if s.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), s.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return seconds


def _max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((pa.detach() - pb.detach()).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


def compare(model: str = "tiny-pythia-1m", num_pairs: int = 8, beta: float = 0.1, lr: float = 1e-4,
            warmup: int = 2, steps: int = 10, max_grad_norm: float = 1.0, max_prompt_tokens: int = 160,
            max_response_tokens: int = 64, threads: int = 1, seed: int = 0, verbose: bool = False) -> dict:
    """Run the agreement check and the throughput comparison; return the report dict (see module doc)."""
    import datasets
    import transformers

    trl, DPOConfig, DPOTrainer = _import_trl()
    if not verbose:
        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
    s = Settings(model, num_pairs, beta, lr, warmup, steps, max_grad_norm, max_prompt_tokens, max_response_tokens,
                 threads, seed)
    torch.set_num_threads(threads)

    initial, tokenizer = load_model_and_tokenizer(model, seed=seed, dtype=torch.float32)
    initial.eval().requires_grad_(False)
    pad_id = tokenizer.pad_token_id

    def fresh_copy(trainable: bool) -> torch.nn.Module:
        return copy.deepcopy(initial).requires_grad_(trainable).train(trainable)

    raw_pairs = builtin_pairs("train", seed=seed)[:num_pairs]
    pairs = [tokenize_pair(tokenizer, p, max_prompt_tokens, max_response_tokens) for p in raw_pairs]
    our_batch = collate_preference_batch(pairs, pad_id)
    tokens_per_step = _batch_tokens(our_batch)
    truncated_ours = any(encode_prompt(tokenizer, p.prompt, max_prompt_tokens)[1]
                         or encode_response(tokenizer, p.chosen, max_response_tokens)[1]
                         or encode_response(tokenizer, p.rejected, max_response_tokens)[1] for p in raw_pairs)
    config = TrainConfig(model=model, loss="dpo", beta=beta, label_smoothing=0.0, lr=lr, max_grad_norm=max_grad_norm,
                         max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens,
                         micro_batch_size=num_pairs, seed=seed)

    # ours: agreement, then timed steps
    our_policy, our_reference = fresh_copy(True), fresh_copy(False)
    ours = _our_agreement(config, our_policy, our_reference, pairs, pad_id)
    our_seconds = _time_our_steps(config, our_policy, our_reference, pairs, pad_id, s)

    # TRL: the same pairs as strings, repeated once per step so a sequential sampler serves the same batch each step
    rows = raw_pairs * (warmup + steps)
    dataset = datasets.Dataset.from_dict({"prompt": [p.prompt for p in rows], "chosen": [p.chosen for p in rows],
                                          "rejected": [p.rejected for p in rows]})
    timer = _step_timer_callback()
    trl_policy, trl_reference = fresh_copy(True), fresh_copy(False)
    with tempfile.TemporaryDirectory(prefix="trl-dpo-compare-") as output_dir, warnings.catch_warnings():
        if not verbose:  # transformers' v6 renames (`is_gradient_checkpointing`), which TRL 1.16 still calls
            warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6.*", category=FutureWarning)
        trl_fields = trl_config_fields(s, output_dir, DPOConfig)
        trainer = DPOTrainer(model=trl_policy, ref_model=trl_reference, args=DPOConfig(**trl_fields),
                             train_dataset=dataset, processing_class=copy.deepcopy(tokenizer), callbacks=[timer])
        if not verbose:
            from transformers.trainer_callback import PrinterCallback
            trainer.remove_callback(PrinterCallback)  # it prints the end-of-training summary even with logging off
        theirs, trl_batch = _trl_agreement(trainer, num_pairs)
        tokens = _check_tokens(trainer, pairs, our_batch, trl_batch)
        torch.set_num_threads(threads)
        trainer.train()
        # after training, policy != reference: the loss comparison means something (at step 0 both are log 2).
        # Both codes score TRL's trained policy against the same reference weights.
        theirs_trained, _ = _trl_agreement(trainer, num_pairs)
    ours_trained = _our_agreement(config, trainer.model, our_reference, pairs, pad_id)
    trl_threads = sorted(timer.threads)

    # agreement
    diffs, diffs_trained = _abs_diffs(ours, theirs), _abs_diffs(ours_trained, theirs_trained)
    # TRL's logged batch means come from its training-loss path (`_compute_loss`); they must match the per-example
    # values from `compute_ref_log_probs`, or those would not be the log-probs its loss used
    trl_internal = max(_logged_vs_mean(theirs), _logged_vs_mean(theirs_trained))

    # throughput: ours per step; TRL from the end of the last warm-up step to the end of the last step
    our_timed = sum(our_seconds[warmup:])
    trl_step_seconds = [b - a for a, b in zip(timer.end[warmup - 1:], timer.end[warmup:])] if warmup else None
    if warmup:
        trl_timed = timer.end[-1] - timer.end[warmup - 1]
    else:  # no warm-up: from the first step's begin
        trl_timed = timer.end[-1] - timer.begin[0]
        trl_step_seconds = [timer.end[0] - timer.begin[0]] + [b - a for a, b in zip(timer.end, timer.end[1:])]
    trl_inner = [e - b for b, e in zip(timer.begin[warmup:], timer.end[warmup:])]
    tokens_per_s_ours = tokens_per_step * steps / our_timed
    tokens_per_s_trl = tokens_per_step * steps / trl_timed

    # after training the same number of steps each way, the two policies should still be (nearly) the same model
    with torch.no_grad():
        trained_loss_ours = compute_loss(config, our_policy.eval(), pairs, pad_id, reference_model=our_reference)[0].item()

    import accelerate

    return {
        "trl_throughput_ratio": tokens_per_s_ours / tokens_per_s_trl,
        "trl_max_abs_diff": max(diffs.values()),
        "loss_ours": ours["loss"],
        "loss_trl": theirs["loss"],
        "tokens_per_s_ours": tokens_per_s_ours,
        "tokens_per_s_trl": tokens_per_s_trl,
        "trl_max_abs_diff_trained": max(diffs_trained.values()),
        "agreement": {
            "abs_diff": diffs,
            "within_target": _within_target(diffs) and _within_target(diffs_trained),
            "targets": {"loss": LOSS_TOLERANCE, "logp": LOGP_TOLERANCE},
            **tokens,
            # TRL 1.16 truncates prompt+response as one sequence (max_length, keep_start); we cut the prompt from the
            # left and each response from the right: the ids can only agree where neither cuts anything
            "truncated_ours": truncated_ours,
            "trl_logged_vs_per_example_mean": trl_internal,
            "ours_logged_vs_per_example_mean": max(_logged_vs_mean(ours), _logged_vs_mean(ours_trained)),
            "logp_chosen_ours": ours["logp_chosen"], "logp_chosen_trl": theirs["logp_chosen"],
            "logp_rejected_ours": ours["logp_rejected"], "logp_rejected_trl": theirs["logp_rejected"],
            "trained_policy": {  # TRL's policy after all steps, scored by both codes against the initial reference
                "note": "at step 0 policy == reference, so both losses are exactly log 2; this is the informative loss check",
                "abs_diff": diffs_trained, "loss_ours": ours_trained["loss"], "loss_trl": theirs_trained["loss"],
                "logp_chosen_ours": ours_trained["logp_chosen"], "logp_chosen_trl": theirs_trained["logp_chosen"],
                "logp_rejected_ours": ours_trained["logp_rejected"], "logp_rejected_trl": theirs_trained["logp_rejected"],
            },
        },
        "throughput": {
            "tokens_per_step": tokens_per_step,
            "timed_steps": steps, "warmup_steps": warmup,
            "seconds_ours": our_timed, "seconds_trl": trl_timed,
            "step_seconds_ours": our_seconds[warmup:], "step_seconds_trl": trl_step_seconds,
            "median_step_seconds_ours": statistics.median(our_seconds[warmup:]),
            "median_step_seconds_trl": statistics.median(trl_step_seconds),
            # TRL's on_step_begin -> on_step_end only: leaves out fetching and collating the batch
            "seconds_trl_step_only": sum(trl_inner),
            "tokens_per_s_trl_step_only": tokens_per_step * steps / sum(trl_inner),
            "trl_timing": "Trainer.train() loop, on_step_end to on_step_end (includes batch fetch + collate, "
                          "as our compute_loss collates); TRL set-up and tokenization excluded",
            "torch_threads_ours": threads, "torch_threads_trl": trl_threads,
        },
        "after_training": {
            "steps": warmup + steps,
            "param_max_abs_diff": _max_param_diff(our_policy, trainer.model),
            "loss_our_policy": trained_loss_ours,          # both policies scored with our compute_loss
            "loss_trl_policy": ours_trained["loss"],
        },
        "settings": {
            "model": model, "dtype": "float32", "parameters": sum(p.numel() for p in initial.parameters()),
            "attn_implementation": initial.config._attn_implementation,
            "num_pairs": num_pairs, "pairs": "builtin_pairs('train')[:num_pairs]", "beta": beta, "loss": "dpo (sigmoid)",
            "optimizer": "torch.optim.AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay=0), constant lr",
            "lr": lr, "max_grad_norm": max_grad_norm, "max_prompt_tokens": max_prompt_tokens,
            "max_response_tokens": max_response_tokens, "torch_threads": threads, "seed": seed, "device": "cpu",
        },
        "trl_config": {k: v for k, v in trl_fields.items() if k != "output_dir"},
        "versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "datasets": datasets.__version__, "accelerate": accelerate.__version__,
                     "python": platform.python_version()},
        "machine": {"arch": platform.machine(), "cpu_count": os.cpu_count()},
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-pythia-1m")
    parser.add_argument("--pairs", type=int, default=8, help="pairs in the fixed batch")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping in both loops (0 disables)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--verbose", action="store_true", help="keep TRL/datasets logging and progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = compare(model=args.model, num_pairs=args.pairs, beta=args.beta, lr=args.lr, warmup=args.warmup,
                     steps=args.steps, max_grad_norm=args.max_grad_norm, threads=args.threads, seed=args.seed,
                     verbose=args.verbose)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")

    agreement, throughput = report["agreement"], report["throughput"]
    print(f"{args.model}, {args.pairs} pairs, beta {args.beta}, {throughput['tokens_per_step']} tokens/step, "
          f"{args.threads} torch thread(s), TRL {report['versions']['trl']}")
    print(f"{'':<22}{'ours':>14}{'TRL':>14}{'|diff|':>12}")
    print(f"{'DPO loss':<22}{report['loss_ours']:>14.8f}{report['loss_trl']:>14.8f}{agreement['abs_diff']['loss']:>12.2e}")
    for name in ("chosen", "rejected"):
        a, b = agreement[f"logp_{name}_ours"], agreement[f"logp_{name}_trl"]
        print(f"{'mean logp ' + name:<22}{sum(a) / len(a):>14.5f}{sum(b) / len(b):>14.5f}"
              f"{agreement['abs_diff']['logp_' + name]:>12.2e}  (max over examples)")
    print(f"{'tokens/s':<22}{report['tokens_per_s_ours']:>14.0f}{report['tokens_per_s_trl']:>14.0f}")
    print(f"{'median step s':<22}{throughput['median_step_seconds_ours']:>14.4f}{throughput['median_step_seconds_trl']:>14.4f}")
    print(f"token ids equal: {agreement['token_ids_equal']}; max |diff| {report['trl_max_abs_diff']:.2e} "
          f"({'within' if agreement['within_target'] else 'MISSES'} target: loss {LOSS_TOLERANCE:g}, logp {LOGP_TOLERANCE:g})")
    print(f"throughput ratio ours/TRL: {report['trl_throughput_ratio']:.2f}x over {throughput['timed_steps']} steps "
          f"(TRL step-only, without batch fetch: {throughput['tokens_per_s_trl_step_only']:.0f} tokens/s)")
    trained = agreement["trained_policy"]
    print(f"after {report['after_training']['steps']} steps each way: max |param diff| "
          f"{report['after_training']['param_max_abs_diff']:.2e}; on TRL's trained policy loss ours "
          f"{trained['loss_ours']:.8f} vs TRL {trained['loss_trl']:.8f}, max |diff| {report['trl_max_abs_diff_trained']:.2e}")
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
