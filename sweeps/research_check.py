"""The research report: do the published patterns show? SFT, a DPO β sweep (after SFT on chosen and
after SFT on chosen+rejected) and PPO, each run through the ordinary sweep entry points, then every
pattern checked by name with its measured numbers (sweeps/research_patterns.py).

    python -m sweeps.research_check                              # embedded default (tiny model, built-in data)
    python -m sweeps.research_check --model smollm2-135m --lora-rank 8   # the real model (needs its extra)
    make research

Writes <out>/research_check.json (every check of every model, merged with earlier models' results),
research_check.md (the table) and research_check.png (the curves behind the checks). Sizes are
flags, so a reduced run says how reduced it was: the JSON records them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sweeps.research_patterns import Check, dpo_checks, ppo_checks, sft_checks  # noqa: E402

EXPERIMENT = "research-check"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sweeps.research_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-pythia-1m", help="built-in size, smollm2-135m, or a Hugging Face name/folder")
    parser.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: every weight)")
    parser.add_argument("--sft-steps", type=int, default=60, help="steps of the SFT study and of each shared SFT warm-up")
    parser.add_argument("--sft-lr", type=float, default=3e-3, help="learning rate of SFT (study and warm-ups)")
    parser.add_argument("--dpo-steps", type=int, default=30, help="steps of each DPO trial")
    parser.add_argument("--dpo-lr", type=float, default=2e-4, help="learning rate of DPO")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.05, 0.2, 0.8], help="DPO β values")
    parser.add_argument("--ppo-steps", type=int, default=20, help="steps of each PPO trial (>= 10: two windows of 5)")
    parser.add_argument("--ppo-lr", type=float, default=1e-4, help="learning rate of PPO")
    parser.add_argument("--kl-coefs", type=float, nargs="+", default=[0.01, 0.2], help="PPO KL coefficients")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the SFT and PPO trials")
    parser.add_argument("--probe-prompts", type=int, default=16, help="probe prompts every trial scores")
    parser.add_argument("--workers", type=int, default=1, help="training workers per trial")
    parser.add_argument("--storage-path", default="probesweep_runs/research", help="sweep storage folder")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite under --storage-path)")
    parser.add_argument("--out", default="benchmarks/results", help="folder of the JSON, the table and the figure")
    parser.add_argument("--phases", nargs="+", default=["sft", "dpo", "ppo"], choices=("sft", "dpo", "ppo"),
                        help="which sweeps to run (the report reads every finished one from the store)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rebuild the report from the sweeps already in the store")
    args = parser.parse_args(argv)
    if args.ppo_steps < 10:
        parser.error("--ppo-steps: at least 10 (the reward check compares the first and the last 5 steps)")
    return args


def tracking_uri(args: argparse.Namespace) -> str:
    return args.tracking_uri or f"sqlite:///{Path(args.storage_path).resolve() / 'mlflow.db'}"


def common_flags(args: argparse.Namespace, name: str) -> list[str]:
    flags = ["--name", name, "--overwrite", "--model", args.model, "--storage-path", args.storage_path,
             "--tracking-uri", tracking_uri(args), "--experiment-name", EXPERIMENT, "--num-workers", str(args.workers),
             "--num-probe-prompts", str(args.probe_prompts), "--max-concurrent-trials", "2"]
    if args.lora_rank:
        flags += ["--lora-rank", str(args.lora_rank)]
    return flags


def run_entry(entry, argv: list[str]) -> None:
    """One sweep through the entry point's own parsing and driver."""
    from sweeps.config import parse_config
    from sweeps.driver import run_sweep
    from sweeps.search import search_space

    config = parse_config(argv, entry)
    outcome = run_sweep(config, search_space(config, entry.searched_values(config)))
    if outcome.failed_trials:
        print("warning: failed trials (left out of the report): " + "; ".join(outcome.failed_trials), flush=True)


def finished_rows(tracker, name: str) -> list[dict] | None:
    """The summary rows of the finished trials of the latest sweep `name` in the store; None if there is none."""
    from sweeps.summary import run_row

    experiment = tracker.client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    parents = tracker.client.search_runs([experiment.experiment_id], filter_string=f"tags.sweep = '{name}'",
                                         order_by=["attributes.start_time DESC"], max_results=50)
    parents = [r for r in parents if r.info.run_name == f"sweep:{name}"]
    if not parents:
        return None
    children = [r for r in tracker.child_runs(experiment.experiment_id, parents[0].info.run_id)
                if r.data.tags.get("stage") == "sweep" and r.info.status == "FINISHED"]
    return [run_row(tracker, r) for r in children] or None


def numbers_only(row: dict) -> dict:
    return {k: v for k, v in row.items() if k in ("run_name", "beta", "sft_recipe", "seed", "ppo_kl_coef")
            or k.startswith("delta/")}


def not_run(name: str, phase: str) -> Check:
    return Check(name, "", None, {}, f"not measured: no finished {phase} sweep in the store (phase not run or cut short)")


def run_model(args: argparse.Namespace) -> dict:
    from infra.tracking import Tracker
    from sweeps import dpo_beta, ppo, sft

    tag = args.model.replace("/", "_")
    names = {phase: f"research-{phase}-{tag}" for phase in ("sft", "dpo", "ppo")}
    seeds = [str(s) for s in args.seeds]
    warmup = ["--sft-steps", str(args.sft_steps), "--sft-lr", str(args.sft_lr)]
    commands = {
        "sft": (sft.ENTRY, ["--max-steps", str(args.sft_steps), "--lr", str(args.sft_lr),
                            "--eval-every", str(max(1, args.sft_steps // 4)), "--seeds", *seeds]),
        "dpo": (dpo_beta.ENTRY, warmup + ["--betas", *[str(b) for b in args.betas], "--sft-recipes", "chosen", "both",
                                          "--lr", str(args.dpo_lr), "--max-steps", str(args.dpo_steps),
                                          "--eval-every", str(max(1, args.dpo_steps // 3))]),
        "ppo": (ppo.ENTRY, warmup + ["--kl-coefs", *[str(c) for c in args.kl_coefs], "--seeds", *seeds,
                                     "--lr", str(args.ppo_lr), "--max-steps", str(args.ppo_steps),
                                     "--eval-every", str(args.ppo_steps)]),
    }
    timings = {}
    for phase in ([] if args.report_only else args.phases):
        started = time.time()
        entry, flags = commands[phase]
        run_entry(entry, common_flags(args, names[phase]) + flags)
        timings[f"{phase}_s"] = round(time.time() - started, 1)
    tracker = Tracker(tracking_uri(args))
    rows = {phase: finished_rows(tracker, name) for phase, name in names.items()}
    ppo_runs = [{"run_name": r["run_name"], "kl_coef": float(r["ppo_kl_coef"]), "seed": r["seed"],
                 "reward": [v for _, v in tracker.metric_history(r["run_id"], "ppo/reward")],
                 "kl": [v for _, v in tracker.metric_history(r["run_id"], "ppo/kl")]} for r in rows["ppo"] or []]
    checks = (sft_checks(rows["sft"]) if rows["sft"] else [not_run("sft.*", "SFT")])
    checks += dpo_checks(rows["dpo"]) if rows["dpo"] else [not_run("dpo.*", "DPO")]
    checks += ppo_checks(ppo_runs) if ppo_runs else [not_run("ppo.*", "PPO")]
    return {"model": args.model, "lora_rank": args.lora_rank, "about": model_description(args.model), "timings": timings,
            "sizes": {k: getattr(args, k) for k in ("sft_steps", "sft_lr", "dpo_steps", "dpo_lr", "betas", "ppo_steps",
                                                    "ppo_lr", "kl_coefs", "seeds", "probe_prompts", "workers")},
            "checks": [c.to_dict() for c in checks],
            "runs": {"sft": [numbers_only(r) for r in rows["sft"] or []], "dpo": [numbers_only(r) for r in rows["dpo"] or []],
                     "ppo": ppo_runs}}


def model_description(model: str) -> str:
    """What the weights are, so a table never passes a dequantized or random-init model off as the original."""
    from trainers.model.factory import TINY_PYTHIA_SIZES
    from trainers.model.pretrained import PRETRAINED_MODELS

    if model in PRETRAINED_MODELS:
        return PRETRAINED_MODELS[model].description
    return "random-init built-in GPT-NeoX model" if model in TINY_PYTHIA_SIZES else "Hugging Face model " + model


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:+.2f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_short(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def markdown(report: dict) -> str:
    lines = ["# Research check", "", "Each row is a published pattern checked on measured numbers (Δ = final minus "
             "first probe log-prob of a trial, nats summed over the response). Sizes are in research_check.json.", ""]
    for model in report["models"].values():
        lines += [f"## {model['model']}" + (f" (LoRA rank {model['lora_rank']})" if model["lora_rank"] else ""), "",
                  *([f"Weights: {model['about']}.", ""] if model.get("about") else []),
                  "| check | result | measured | note |", "|---|---|---|---|"]
        for check in model["checks"]:
            result = "not measured" if check["passed"] is None else "pass" if check["passed"] else "**fail**"
            lines.append(f"| {check['name']} | {result} | "
                         f"{_short(check['numbers'])} | {check['note']} |")
        lines.append("")
    return "\n".join(lines)


def figure(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"].values())
    fig, axes = plt.subplots(len(models), 3, figsize=(15, 4 * len(models)), squeeze=False)
    categories = ("chosen", "rejected", "paraphrase_chosen", "paraphrase_rejected", "variant", "random", "nonresponse", "greedy")
    ticks = range(len(categories))
    for row, model in zip(axes, models):
        sft_rows = model["runs"]["sft"]
        if sft_rows:
            row[0].bar(ticks, [sum(r.get(f"delta/{c}", 0) for r in sft_rows) / len(sft_rows) for c in categories])
        row[0].set_title(f"{model['model']}: SFT, Δ log p per category")
        dpo_rows = sorted(model["runs"]["dpo"], key=lambda r: (r["sft_recipe"], float(r["beta"])))
        width = 0.8 / max(1, len(dpo_rows))
        for i, r in enumerate(dpo_rows):
            row[1].bar([j - 0.4 + (i + 0.5) * width for j in ticks], [r.get(f"delta/{c}", 0) for c in categories],
                       width, label=f"β={r['beta']} after SFT on {r['sft_recipe']}")
        row[1].set_title(f"{model['model']}: DPO, Δ log p per category")
        if dpo_rows:
            row[1].legend(fontsize=7)
        for r in model["runs"]["ppo"]:
            row[2].plot(range(1, len(r["reward"]) + 1), r["reward"], label=f"kl_coef={r['kl_coef']} seed={r['seed']}")
        row[2].set_title(f"{model['model']}: PPO, mean reward per step")
        row[2].set_xlabel("step")
        if model["runs"]["ppo"]:
            row[2].legend(fontsize=7)
        for ax, phase in zip(row, ("sft", "dpo", "ppo")):
            if not model["runs"][phase]:  # an empty panel says why rather than showing bare axes
                ax.text(0.5, 0.5, f"{phase.upper()} not measured for this model", ha="center", va="center",
                        transform=ax.transAxes)
        for ax in row[:2]:
            ax.set_xticks(ticks, categories, rotation=40, ha="right")
            ax.set_ylabel("Δ log p (nats, final − first)")
            ax.axhline(0, color="black", linewidth=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "research_check.json"
    report = json.loads(json_path.read_text()) if json_path.exists() else {"models": {}}
    earlier = report["models"].get(args.model, {})
    entry = report["models"][args.model] = run_model(args)
    # the timings of phases not run now stay: the report reads every finished phase from the store
    entry["timings"] = {**earlier.get("timings", {}), **entry["timings"]}
    if args.report_only and "provenance" in earlier:  # nothing ran: the runs behind the numbers are the same
        entry["provenance"] = earlier["provenance"]
    for name, model in report["models"].items():  # entries written before the description was recorded
        model.setdefault("about", model_description(name))
    json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "research_check.md").write_text(markdown(report) + "\n")
    figure(report, out / "research_check.png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
