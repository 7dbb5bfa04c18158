"""A DPO beta sweep: SFT warm-up on chosen responses (once, shared), then DPO at each beta.

    python sweeps/dpo_beta.py                       # embedded default: tiny model, built-in data, local Ray
    python sweeps/dpo_beta.py --betas 0.1 0.5 --lrs 1e-4 5e-4 --model tiny-pythia-4m
    python sweeps/dpo_beta.py --model EleutherAI/pythia-410m --dataset Anthropic/hh-rlhf:helpful-base \\
        --address auto --tracking-uri http://head:5000 --use-gpu true
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sweeps.config import parse_config  # noqa: E402
from sweeps.driver import print_outcome, run_sweep  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from ray import tune

    config = parse_config(argv, __doc__)
    search_space = {"beta": tune.grid_search(config.betas), "lr": tune.grid_search(config.sweep_lrs())}
    outcome = run_sweep(config, search_space)
    print_outcome(outcome)
    return 1 if outcome.failed_trials else 0


if __name__ == "__main__":
    sys.exit(main())
