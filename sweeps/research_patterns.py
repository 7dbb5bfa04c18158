"""The published patterns the research report checks, as pure functions of measured numbers.

Each check gets the rows the sweep summaries give (`delta/<category>`: final minus first probe
log-prob of a trial, in nats summed over the response) or a PPO run's per-step curves, and returns
a `Check`: its name, the numbers it looked at, pass/fail, and the pattern it stands for. A check
compares measured numbers with each other or with zero; none is given a threshold fitted to a run.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

STATIC = ("chosen", "rejected", "paraphrase_chosen", "paraphrase_rejected", "variant", "random", "nonresponse")


@dataclass
class Check:
    name: str
    pattern: str           # what the literature reports
    passed: bool | None    # None: not measured
    numbers: dict = field(default_factory=dict)
    note: str = ""         # why it did not show, when it did not

    def to_dict(self) -> dict:
        return asdict(self)


def _delta(row: dict, category: str) -> float:
    value = row.get(f"delta/{category}")
    if value is None:
        raise KeyError(f"run {row.get('run_name')} has no delta/{category}")
    return float(value)


def _mean(rows: list[dict], category: str) -> float:
    return statistics.mean(_delta(r, category) for r in rows)


def sft_checks(rows: list[dict]) -> list[Check]:
    """The seed study's SFT picture, averaged over the SFT trials (seeds)."""
    d = {c: _mean(rows, c) for c in STATIC}
    others = {c: v for c, v in d.items() if c != "nonresponse"}
    return [
        Check("sft.chosen_rises", "SFT on chosen raises log p(chosen)", d["chosen"] > 0, {"delta_chosen": d["chosen"]}),
        Check("sft.rejected_rises_too", "log p(rejected) rises too, though it is never trained on",
              d["rejected"] > 0, {"delta_rejected": d["rejected"], "delta_chosen": d["chosen"]}),
        Check("sft.paraphrases_and_variant_rise", "paraphrases of chosen and rejected and the variant answer rise",
              min(d["paraphrase_chosen"], d["paraphrase_rejected"], d["variant"]) > 0,
              {k: d[k] for k in ("paraphrase_chosen", "paraphrase_rejected", "variant")}),
        Check("sft.nonresponse_rises_least", "the non-response rises least of all categories, or falls",
              d["nonresponse"] < min(others.values()) or d["nonresponse"] < 0,
              {"delta_nonresponse": d["nonresponse"], "lowest_other": min(others.values())}),
    ]


def dpo_checks(rows: list[dict]) -> list[Check]:
    """Ren & Sutherland's DPO picture: rows of a β sweep with sft_recipe 'chosen' and 'both'."""
    chosen_rows = [r for r in rows if r.get("sft_recipe", "chosen") == "chosen"]
    both_rows = [r for r in rows if r.get("sft_recipe") == "both"]
    betas = sorted({float(r["beta"]) for r in chosen_rows})
    by_beta = {b: [r for r in chosen_rows if float(r["beta"]) == b] for b in betas}
    rejected_lowest = {b: min(STATIC, key=lambda c: _mean(rs, c)) for b, rs in by_beta.items()}
    chosen = {b: _mean(rs, "chosen") for b, rs in by_beta.items()}
    rejected = {b: _mean(rs, "rejected") for b, rs in by_beta.items()}
    greedy = {b: _mean(rs, "greedy") for b, rs in by_beta.items() if all("delta/greedy" in r for r in rs)}
    checks = [
        Check("dpo.rejected_falls_most", "log p(rejected) falls, more than any other category's",
              all(c == "rejected" and rejected[b] < 0 for b, c in rejected_lowest.items()),
              {"delta_rejected_by_beta": rejected, "lowest_category_by_beta": rejected_lowest},
              "; ".join(f"β={b}: {c} fell more ({_mean(by_beta[b], c):+.1f} vs rejected {rejected[b]:+.1f})"
                        for b, c in rejected_lowest.items() if c != "rejected")),
        Check("dpo.chosen_falls_too", "log p(chosen) falls too (the squeezing effect)",
              all(v < 0 for v in chosen.values()), {"delta_chosen_by_beta": chosen}),
        Check("dpo.greedy_rises", "the likelihood of the policy's own greedy decode rises",
              bool(greedy) and all(v > 0 for v in greedy.values()), {"delta_greedy_by_beta": greedy},
              "; ".join(f"β={b}: greedy fell ({v:+.1f}); the decode changes between evaluations, so its Δ compares "
                        "different texts" for b, v in greedy.items() if v <= 0)),
    ]
    margins = {b: chosen[b] - rejected[b] for b in betas}
    if len(betas) >= 3:
        gaps = list(margins.values())
        steps = [b - a for a, b in zip(gaps, gaps[1:])]
        monotone = all(s > 0 for s in steps) or all(s < 0 for s in steps)
        direction = "grows" if steps and steps[0] > 0 else "shrinks"
        passed, numbers = monotone, {"betas": betas, "margin_by_beta": margins, "delta_rejected_by_beta": rejected}
        note = f"the gap {direction} with β" if monotone else "the gap is not monotone in β at this size"
    else:  # two points are always monotone: a check that cannot fail is not reported as a pass
        passed, numbers = None, {"betas": betas, "margin_by_beta": margins}
        note = f"not measured: monotonicity needs at least 3 β values, this sweep ran {len(betas)}"
    checks.append(Check("dpo.beta_dependence", "the chosen-rejected log-prob gap changes monotonically with β",
                        passed, numbers, note))
    if both_rows:
        common = sorted({float(r["beta"]) for r in both_rows} & set(betas))
        softer = {b: _mean([r for r in both_rows if float(r["beta"]) == b], "chosen") for b in common}
        checks.append(Check("dpo.sft_both_softens_squeezing",
                            "SFT on chosen and rejected first leaves log p(chosen) higher under DPO than SFT on chosen",
                            bool(common) and statistics.mean(softer.values()) > statistics.mean(chosen[b] for b in common),
                            {"delta_chosen_after_sft_chosen": {b: chosen[b] for b in common},
                             "delta_chosen_after_sft_both": softer}))
    for check in checks:
        if not check.passed and not check.note:
            check.note = "the measured numbers above do not show it at this size"
    return checks


def window_gain(curve: list[float], window: int = 5) -> float:
    """Mean of the last `window` values minus mean of the first `window`."""
    if len(curve) < 2 * window:
        raise ValueError(f"a curve of {len(curve)} steps is too short for two windows of {window}")
    return statistics.mean(curve[-window:]) - statistics.mean(curve[:window])


def ppo_checks(runs: list[dict]) -> list[Check]:
    """`runs`: {"kl_coef", "seed", "reward": [per step], "kl": [per step]}."""
    gains = [window_gain(r["reward"]) for r in runs]
    spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
    effect = statistics.mean(gains) / spread if spread > 0 else float("inf") if statistics.mean(gains) > 0 else 0.0
    coefs = sorted({r["kl_coef"] for r in runs})
    final_kl = {c: statistics.mean(statistics.mean(r["kl"][-5:]) for r in runs if r["kl_coef"] == c) for c in coefs}
    checks = [Check("ppo.reward_rises", "mean reward of the last 5 steps above the first 5, in every run",
                    all(g > 0 for g in gains),
                    {"gain_per_run": gains, "mean_gain": statistics.mean(gains), "sd_gain": spread,
                     "effect_size_mean_over_sd": effect})]
    if not checks[0].passed:
        checks[0].note = "some runs' reward did not rise over these steps"
    if len(coefs) >= 2:
        checks.append(Check("ppo.kl_grows_more_with_smaller_coef",
                            "the policy's KL to the reference ends higher with a smaller KL coefficient",
                            final_kl[coefs[0]] > final_kl[coefs[-1]], {"final_kl_by_coef": final_kl}))
        if not checks[-1].passed:
            checks[-1].note = ("a KL estimate at or below 0: the policy has hardly left the reference, so the "
                               "estimates are sampling noise" if min(final_kl.values()) <= 0
                               else "KL ended higher with the larger coefficient")
    return checks
