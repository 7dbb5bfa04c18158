"""Which tokens moved: per-token Δ log p between two evaluations of one run, as coloured text and a heatmap.

A category's summed log-prob hides where it moved: a fall of 5 nats may be one token that the
model now refuses or a small slide over every token. For chosen, rejected and greedy examples this
shows each token coloured by log p(after) - log p(before) (an HTML artifact), the same as a
heatmap (PNG), and the tokens that moved most (CSV).

Static categories score the same tokens at both evaluations. The greedy decode is re-made at
every evaluation, so Δ is defined only on the prefix both decodes share; the later decode's tokens
after that point are shown uncoloured and marked.

    python -m probes.token_views --run-id <id> [--steps A B] [--tracking-uri URI] [--out DIR]
"""
from __future__ import annotations

import argparse
import html
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from probes.token_records import ARTIFACT_DIR, TokenScores, read_token_npz, step_of_artifact

DEFAULT_CATEGORIES = ("chosen", "rejected", "greedy")


@dataclass(frozen=True)
class TokenDelta:
    """One response: the later evaluation's tokens and Δ log p on the first `shared` of them."""
    prompt_id: int
    category: str
    token_texts: list[str]
    delta: np.ndarray        # [shared] float; log p(after) - log p(before)
    logp_after: np.ndarray   # [n] float
    shared: int              # tokens identical in both evaluations, from the start

    @property
    def diverged(self) -> bool:
        return self.shared < len(self.token_texts)


def token_delta(prompt_id: int, category: str, before: TokenScores, after: TokenScores) -> TokenDelta:
    """Δ log p per token on the longest common prefix of the two token sequences."""
    n = min(len(before.token_ids), len(after.token_ids))
    differs = np.flatnonzero(before.token_ids[:n] != after.token_ids[:n])
    shared = int(differs[0]) if differs.size else n
    delta = after.token_logps[:shared].astype(np.float64) - before.token_logps[:shared].astype(np.float64)
    return TokenDelta(prompt_id, category, list(after.token_texts), delta, after.token_logps.astype(np.float64), shared)


def token_deltas(before: Mapping[tuple[int, str], TokenScores], after: Mapping[tuple[int, str], TokenScores],
                 categories: Sequence[str] = DEFAULT_CATEGORIES, max_prompts: int | None = None) -> list[TokenDelta]:
    """Every (prompt, category) present at both evaluations, ordered by category then prompt."""
    prompts = sorted({p for p, c in after if c in categories and (p, c) in before})
    if max_prompts is not None:
        prompts = prompts[:max_prompts]
    return [token_delta(p, c, before[(p, c)], after[(p, c)])
            for c in categories for p in prompts if (p, c) in before and (p, c) in after]


def top_movers(deltas: Sequence[TokenDelta], n: int = 20) -> list[dict]:
    """The n tokens with the largest |Δ log p|, largest first."""
    rows = [{"category": d.category, "prompt_id": d.prompt_id, "position": i, "token": d.token_texts[i],
             "delta_logp": float(d.delta[i]), "logp_after": float(d.logp_after[i])}
            for d in deltas for i in range(d.shared)]
    return sorted(rows, key=lambda r: -abs(r["delta_logp"]))[:n]


def _scale(deltas: Sequence[TokenDelta]) -> float:
    """Colour saturation: the largest |Δ| seen (at least 1e-6 nats, so an unmoved run stays white)."""
    return max([float(np.abs(d.delta).max()) for d in deltas if d.shared] + [1e-6])


def _colour(value: float, scale: float) -> str:
    """Red for a fall, blue for a rise; white at 0."""
    strength = min(1.0, abs(value) / scale)
    fade = int(round(255 * (1 - 0.85 * strength)))
    return f"rgb(255,{fade},{fade})" if value < 0 else f"rgb({fade},{fade},255)"


def render_html(deltas: Sequence[TokenDelta], steps: tuple[int, int], title: str = "") -> str:
    """Each response as coloured tokens (hover: Δ and log p), grouped by category."""
    scale = _scale(deltas)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>per-token Δ log p</title><style>",
             "body{font-family:sans-serif;max-width:1100px;margin:1em auto}",
             ".r{font-family:monospace;white-space:pre-wrap;margin:.3em 0 .8em;line-height:1.7}",
             ".t{border-radius:2px;padding:0 1px}.u{color:#999;text-decoration:underline dotted}</style></head><body>",
             f"<h2>{html.escape(title)} Δ log p per token, step {steps[0]} → {steps[1]}</h2>",
             f"<p>red: the token's log-prob fell, blue: it rose; full colour = {scale:.3g} nats. "
             "Grey underlined: tokens of a re-made greedy decode with no counterpart at the earlier step.</p>"]
    category = None
    for d in deltas:
        if d.category != category:
            category = d.category
            parts.append(f"<h3>{html.escape(category)}</h3>")
        total = float(d.delta.sum())
        note = f", decode changed after token {d.shared}" if d.diverged else ""
        parts.append(f"<div>prompt {d.prompt_id}: Σ Δ = {total:+.3f} nats over {d.shared} tokens{note}</div><div class='r'>")
        for i, text in enumerate(d.token_texts):
            shown = html.escape(text)
            if i < d.shared:
                tip = f"Δ {d.delta[i]:+.3f}, log p {d.logp_after[i]:.3f}"
                parts.append(f"<span class='t' style='background:{_colour(d.delta[i], scale)}' title='{tip}'>{shown}</span>")
            else:
                parts.append(f"<span class='t u' title='log p {d.logp_after[i]:.3f}'>{shown}</span>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "".join(parts)


def plot_heatmap(deltas: Sequence[TokenDelta], steps: tuple[int, int], title: str = ""):
    """Rows = responses, columns = token positions; colour = Δ log p (blank past the shared tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max([d.shared for d in deltas] + [1])
    grid = np.full((max(1, len(deltas)), width), np.nan)
    for row, d in enumerate(deltas):
        grid[row, : d.shared] = d.delta
    scale = _scale(deltas)
    figure, axis = plt.subplots(figsize=(min(16, 2 + 0.35 * width), 1.2 + 0.3 * len(grid)))
    image = axis.imshow(grid, cmap="coolwarm_r", vmin=-scale, vmax=scale, aspect="auto", interpolation="nearest")
    axis.set_yticks(range(len(deltas)), [f"{d.category} #{d.prompt_id}" for d in deltas], fontsize="small")
    axis.set_xlabel("response token position")
    figure.colorbar(image, ax=axis, label="Δ log p (nats)")
    axis.set_title(f"{title} Δ log p per token, step {steps[0]} → {steps[1]}".strip())
    figure.tight_layout()
    return figure


# --- the command -------------------------------------------------------------------------------------------

def available_steps(artifact_names: Sequence[str]) -> list[int]:
    return sorted(s for s in (step_of_artifact(n) for n in artifact_names) if s is not None)


def choose_steps(available: Sequence[int], requested: Sequence[int] | None) -> tuple[int, int]:
    """(before, after): the requested pair, or the first and last evaluation; ValueError names the fix."""
    if len(available) < 2 and not requested:
        raise ValueError(f"the run has {len(available)} evaluation(s) with per-token log-probs; two are needed")
    if not requested:
        return available[0], available[-1]
    missing = [s for s in requested if s not in available]
    if missing:
        raise ValueError(f"--steps: no per-token log-probs at step(s) {missing}; the run has {list(available)}")
    return requested[0], requested[1]


def make_views(tracker, run_id: str, steps: Sequence[int] | None = None,
               categories: Sequence[str] = DEFAULT_CATEGORIES, max_prompts: int = 8, out_dir: str | Path | None = None,
               log_to_run: bool = True) -> dict[str, Path]:
    """Download two evaluations' npz files of a run, render the views, log them to the run under
    `token_views/` (and keep copies in `out_dir`). Returns the written files."""
    names = tracker.list_artifacts(run_id, ARTIFACT_DIR)
    before_step, after_step = choose_steps(available_steps(names), steps)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="token_views_"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        scores = [read_token_npz(tracker.download_artifact(run_id, f"{ARTIFACT_DIR}/step_{s:06d}.npz", tmp))
                  for s in (before_step, after_step)]
    deltas = token_deltas(scores[0], scores[1], categories, max_prompts)
    if not deltas:
        raise ValueError(f"--categories: none of {list(categories)} is in both evaluations")
    title = tracker.run(run_id).info.run_name or run_id
    stem = f"step_{before_step:06d}_to_{after_step:06d}"
    files = {"html": out / f"{stem}.html", "png": out / f"{stem}.png", "csv": out / f"{stem}_top_tokens.csv"}
    files["html"].write_text(render_html(deltas, (before_step, after_step), title), encoding="utf-8")
    figure = plot_heatmap(deltas, (before_step, after_step), title)
    figure.savefig(files["png"], dpi=110)
    import matplotlib.pyplot as plt
    import pandas as pd

    plt.close(figure)
    pd.DataFrame(top_movers(deltas, 30)).to_csv(files["csv"], index=False)
    if log_to_run:
        for path in files.values():
            tracker.log_artifact(run_id, path, "token_views")
    return files


def main(argv: Sequence[str] | None = None) -> int:
    from infra.tracking import Tracker, default_tracking_uri

    parser = argparse.ArgumentParser(prog="python -m probes.token_views", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-id", required=True, help="a trial's MLflow run id")
    parser.add_argument("--steps", type=int, nargs=2, metavar=("BEFORE", "AFTER"),
                        help="the two evaluations (default: first and last)")
    parser.add_argument("--tracking-uri", default=None, help="default: ./mlflow.db as an absolute SQLite URI")
    parser.add_argument("--categories", nargs="+", default=list(DEFAULT_CATEGORIES))
    parser.add_argument("--max-prompts", type=int, default=8)
    parser.add_argument("--out", default="token_views", help="folder for local copies (default ./token_views)")
    parser.add_argument("--no-log", action="store_true", help="do not log the views to the run")
    args = parser.parse_args(argv)
    if args.max_prompts < 1:
        parser.error("--max-prompts: must be >= 1")
    tracker = Tracker(args.tracking_uri or default_tracking_uri())
    try:
        tracker.run(args.run_id)
    except Exception:  # noqa: BLE001 - any lookup failure means the same to the user
        print(f"--run-id: no run {args.run_id!r} in {tracker.tracking_uri} (check --tracking-uri)", file=sys.stderr)
        return 2
    try:
        files = make_views(tracker, args.run_id, args.steps, args.categories, args.max_prompts, args.out,
                           log_to_run=not args.no_log)
    except ValueError as error:
        print(str(error), file=sys.stderr)
        return 2
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
