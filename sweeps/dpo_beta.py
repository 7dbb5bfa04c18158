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

from sweeps.config import EntryPoint, SweepConfig  # noqa: E402
from sweeps.driver import run  # noqa: E402
from trainers.config import preference_losses  # noqa: E402

ENTRY = EntryPoint(
    prog="sweeps/dpo_beta.py", description=__doc__, defaults=SweepConfig(),
    losses=preference_losses(),
    searched=("beta", "lr", "loss", "seed", "sft_recipe"),
    fixed={"models": "dpo_beta.py trains one --model; sweeps/model_size.py sweeps models"},
)


def main(argv: list[str] | None = None) -> int:
    return run(ENTRY, argv)


if __name__ == "__main__":
    sys.exit(main())
