"""The same recipe across model sizes: each model gets its own shared SFT warm-up, then DPO per beta.

    python sweeps/model_size.py                                   # tiny-pythia-1m and -4m, built-in data
    python sweeps/model_size.py --models tiny-pythia-1m tiny-pythia-4m tiny-pythia-16m --betas 0.1 0.5
    python sweeps/model_size.py --models EleutherAI/pythia-160m EleutherAI/pythia-410m --use-gpu true --address auto
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sweeps.config import SweepConfig, parse_config  # noqa: E402
from sweeps.driver import run_entry_point  # noqa: E402

# CPU share per training worker by size: the small trials pack together, the large one gets more
DEFAULTS = SweepConfig(name="model-size", betas=[0.1], models=["tiny-pythia-1m", "tiny-pythia-4m"], max_concurrent_trials=2,
                       worker_shares=["tiny-pythia-1m=0.2", "tiny-pythia-4m=0.3", "tiny-pythia-16m=0.6"])


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv, __doc__, defaults=DEFAULTS)
    return run_entry_point(config, {"model": config.models, "beta": config.betas, "lr": config.sweep_lrs()})


if __name__ == "__main__":
    sys.exit(main())
