"""A real Ray Train worker given a CPU share runs floor(share) torch threads (at least one)."""
from __future__ import annotations

import os

import pytest

from infra.cpu_threads import threads_for_cpus


@pytest.mark.parametrize("cpus", [0.3, 2.0])
def test_a_train_worker_runs_as_many_threads_as_its_share(local_ray, tmp_path, cpus):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainers.config import TrainConfig

    def report_threads(loop_config: dict) -> None:  # nested: Ray ships it by value to the worker
        from pathlib import Path

        import torch

        from trainers.runs.train_loop import configure_worker

        torch.set_num_threads(5)  # whatever the process had before: configure_worker must set it
        configure_worker(loop_config["train"])
        # Train V2 keeps a run's metrics only beside a checkpoint: the worker writes its count (one machine)
        Path(loop_config["out"]).write_text(str(torch.get_num_threads()))

    train = TrainConfig(cpus_per_worker=cpus)
    trainer = TorchTrainer(report_threads, train_loop_config={"train": train, "out": str(tmp_path / "threads")},
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
                           run_config=RunConfig(name=f"threads-{cpus}", storage_path=str(tmp_path)))
    trainer.fit()
    assert int((tmp_path / "threads").read_text()) == threads_for_cpus(cpus) == (1 if cpus < 1 else 2)
