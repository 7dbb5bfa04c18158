"""Probe scoring: one shared prompt encoding for all categories vs the baselines.

    python benchmarks/probe_scoring.py            # defaults: 64 prompts x 7 categories, a few minutes on 2 cores

Builds a random-init GPT-NeoX (Pythia architecture, fixed seed) and a synthetic probe set of token
ids (prompts ~3x as long as responses, lengths jittered), then times, best of `--repeats` after one
warm-up, `score_shared_prompt` against `score_per_category` (the seed's one forward per category)
and `score_concatenated` (all categories in one padded batch). Checks that shared and per-category
sums agree and writes benchmarks/results/probe_scoring.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from probes.scoring import score_concatenated, score_per_category, score_shared_prompt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "probe_scoring.json"
METHODS = {"shared": score_shared_prompt, "per_category": score_per_category, "concatenated": score_concatenated}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64, help="number of prompts N")
    parser.add_argument("--categories", type=int, default=7, help="responses per prompt K")
    parser.add_argument("--prompt-len", type=int, default=90, help="mean prompt length in tokens")
    parser.add_argument("--response-len", type=int, default=30, help="mean response length in tokens")
    parser.add_argument("--jitter", type=float, default=0.25, help="lengths are uniform in mean * (1 +- jitter)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--prompts-per-batch", type=int, default=8, help="batch size in prompts, the same for every method")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per method; the best is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def build_model(args) -> GPTNeoXForCausalLM:
    torch.manual_seed(args.seed)
    config = GPTNeoXConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=4 * args.hidden, rotary_pct=0.25,
        max_position_embeddings=4 * (args.prompt_len + args.response_len), tie_word_embeddings=False,
    )
    return GPTNeoXForCausalLM(config).eval()


def synthetic_probes(args) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Random token ids; id 0 is kept for padding. Lengths ~ mean * U(1 - jitter, 1 + jitter)."""
    rng = random.Random(args.seed)

    def tokens(mean: int) -> list[int]:
        length = max(1, round(mean * rng.uniform(1 - args.jitter, 1 + args.jitter)))
        return [rng.randrange(1, args.vocab) for _ in range(length)]

    prompts = [tokens(args.prompt_len) for _ in range(args.prompts)]
    responses = [[tokens(args.response_len) for _ in range(args.categories)] for _ in range(args.prompts)]
    return prompts, responses


def run_rounds(calls: dict, repeats: int) -> tuple[dict[str, list[float]], dict]:
    """Wall times of each call in `repeats` rounds after one warm-up round, and each call's result.

    Rounds alternate the methods (A B C, A B C, ...) so that a burst of load from other processes
    on a shared machine hurts all methods alike instead of one.
    """
    results = {name: call() for name, call in calls.items()}  # warm-up: allocator, kernels, lazy inits
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            results[name] = call()
            times[name].append(time.perf_counter() - start)
    return times, results


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    prompts, responses = synthetic_probes(args)
    prompt_tokens = sum(map(len, prompts))
    response_tokens = sum(len(r) for rows in responses for r in rows)

    calls = {name: partial(method, model, prompts, responses, pad_id=0, prompts_per_batch=args.prompts_per_batch)
             for name, method in METHODS.items()}
    all_times, results = run_rounds(calls, args.repeats)
    timings = {name: min(times) for name, times in all_times.items()}

    max_abs_diff = float(np.abs(results["shared"].sums - results["per_category"].sums).max())
    max_abs_diff_concatenated = float(np.abs(results["concatenated"].sums - results["per_category"].sums).max())
    report = {
        "speedup": timings["per_category"] / timings["shared"],
        "concatenated_speedup": timings["per_category"] / timings["concatenated"],
        "shared_vs_concatenated_speedup": timings["concatenated"] / timings["shared"],
        "max_abs_diff": max_abs_diff,
        "max_abs_diff_concatenated": max_abs_diff_concatenated,
        "counts_equal": bool((results["shared"].counts == results["per_category"].counts).all()),
        "seconds_best_of_repeats": timings,
        "seconds_all_repeats": all_times,
        "repeats": args.repeats,
        "shapes": {"prompts": args.prompts, "categories": args.categories,
                   "prompt_tokens_mean": prompt_tokens / args.prompts,
                   "response_tokens_mean": response_tokens / (args.prompts * args.categories),
                   "prompts_per_batch": args.prompts_per_batch},
        "prompt_response_token_ratio": (prompt_tokens / args.prompts) / (response_tokens / (args.prompts * args.categories)),
        "model": {"architecture": "GPTNeoXForCausalLM", "hidden": args.hidden, "layers": args.layers,
                  "heads": args.heads, "vocab": args.vocab, "dtype": "float32",
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "attn_implementation": model.config._attn_implementation},
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "python": platform.python_version()},
        "machine": platform.machine(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")

    print(f"{args.prompts} prompts x {args.categories} categories, prompt/response tokens "
          f"{report['prompt_response_token_ratio']:.2f}, {report['torch_threads']} threads")
    print(f"{'method':<14}{'seconds':>10}{'vs per_category':>18}")
    for name in METHODS:
        print(f"{name:<14}{timings[name]:>10.3f}{timings['per_category'] / timings[name]:>17.2f}x")
    print(f"speedup (per_category / shared): {report['speedup']:.2f}x; "
          f"concatenated speedup: {report['concatenated_speedup']:.2f}x; "
          f"max |shared - per_category| of sums: {max_abs_diff:.2e} nats")
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
