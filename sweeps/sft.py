"""The seed study: SFT only, with the category curves (chosen, rejected, paraphrases, variant,
random, non-response, greedy) of every trial — the run that reproduces its figure.

    python sweeps/sft.py                                # built-in data, tiny model, local Ray
    python sweeps/sft.py --lrs 1e-3 3e-3 --seeds 0 1 --max-steps 300
    python sweeps/sft.py --model EleutherAI/pythia-2.8b --dataset Anthropic/hh-rlhf:helpful-base --use-gpu true
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sweeps.config import SweepConfig, parse_config  # noqa: E402
from sweeps.driver import run_entry_point  # noqa: E402
from trainers.config import TrainConfig  # noqa: E402

DEFAULTS = SweepConfig(name="sft", sft_steps=0, betas=[], train=TrainConfig(loss="sft", lr=3e-3, max_steps=200, eval_every=20))


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv, __doc__, defaults=DEFAULTS)
    config = replace(config, sft_steps=0, train=replace(config.train, loss="sft"))  # no warm-up: SFT is the study
    return run_entry_point(config, {"lr": config.sweep_lrs(), "seed": config.seeds, "model": config.models})


if __name__ == "__main__":
    sys.exit(main())
