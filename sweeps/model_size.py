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

from sweeps.config import EntryPoint, SweepConfig  # noqa: E402
from sweeps.driver import run  # noqa: E402
from trainers.config import preference_losses  # noqa: E402

# CPU share per training worker by size: the small trials pack together, the large one gets more
ENTRY = EntryPoint(
    prog="sweeps/model_size.py", description=__doc__,
    defaults=SweepConfig(name="model-size", betas=[0.1], models=["tiny-pythia-1m", "tiny-pythia-4m"], max_concurrent_trials=2,
                         worker_shares=["tiny-pythia-1m=0.2", "tiny-pythia-4m=0.3", "tiny-pythia-16m=0.6"]),
    losses=preference_losses(),
    searched=("model", "beta", "lr"),
)


def main(argv: list[str] | None = None) -> int:
    return run(ENTRY, argv)


if __name__ == "__main__":
    sys.exit(main())
