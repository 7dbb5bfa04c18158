"""The seed study: SFT only, with the category curves (chosen, rejected, paraphrases, variant,
random, non-response, greedy) of every trial — the run that reproduces its figure.

    python sweeps/sft.py                                # built-in data, tiny model, local Ray
    python sweeps/sft.py --lrs 1e-3 3e-3 --seeds 0 1 --max-steps 300
    python sweeps/sft.py --model EleutherAI/pythia-2.8b --dataset Anthropic/hh-rlhf:helpful-base --use-gpu true
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sweeps.config import EntryPoint, SweepConfig  # noqa: E402
from sweeps.driver import run  # noqa: E402
from trainers.config import TrainConfig  # noqa: E402

_NO_WARMUP = "sft.py is the SFT study itself: no SFT warm-up runs before it"
ENTRY = EntryPoint(
    prog="sweeps/sft.py", description=__doc__,
    defaults=SweepConfig(name="sft", sft_steps=0, betas=[], train=TrainConfig(loss="sft", lr=3e-3, max_steps=200, eval_every=20)),
    searched=("lr", "seed", "model", "sft_recipe"),
    fixed={"loss": "sft.py trains with loss sft; preference losses are sweeps/dpo_beta.py's, PPO is sweeps/ppo.py's",
           "sft_steps": _NO_WARMUP, "sft_lr": _NO_WARMUP + " (use --lr / --lrs)"},
)


def main(argv: list[str] | None = None) -> int:
    return run(ENTRY, argv)


if __name__ == "__main__":
    sys.exit(main())
