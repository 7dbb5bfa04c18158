"""What a Tune trial hands to Ray Train: a light module, so the trial process (which only orchestrates)
never imports transformers and the trainers; each training worker imports them when it starts."""
from __future__ import annotations


def train_loop_per_worker(loop_config: dict) -> None:
    from trainers.runs.train_loop import train_loop_per_worker as run

    run(loop_config)
