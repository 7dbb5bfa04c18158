"""A DPO beta sweep: SFT warm-up (once, shared), then a preference-optimisation trial per beta x lr.

    python sweeps/dpo_beta.py                       # embedded default: tiny model, built-in data, local Ray
    python sweeps/dpo_beta.py --betas 0.1 0.5 --lrs 1e-4 5e-4 --losses dpo ipo --seeds 0 1
    python sweeps/dpo_beta.py --sft-recipes chosen both     # the squeezing-effect remedy: SFT on chosen and rejected
    python sweeps/dpo_beta.py --search optuna --num-samples 12 --scheduler asha --metric dpo/reward_accuracy --mode max
    python sweeps/dpo_beta.py --model EleutherAI/pythia-410m --dataset Anthropic/hh-rlhf:helpful-base \\
        --address auto --tracking-uri http://head:5000 --use-gpu true
    python sweeps/dpo_beta.py --resume              # continue an interrupted sweep of the same --name
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sweeps.config import parse_config  # noqa: E402
from sweeps.driver import run_entry_point  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv, __doc__)
    return run_entry_point(config, {"beta": config.betas, "lr": config.sweep_lrs(), "loss": config.losses,
                                  "seed": config.seeds, "sft_recipe": config.sft_recipes})


if __name__ == "__main__":
    sys.exit(main())
