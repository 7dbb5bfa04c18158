"""A run that cannot go on as its trial recorded it is refused once, not retried: real Ray Train workers
(two, so the ranks agree through the process group) find a probe set whose hash is not the recorded
one; Train's FailureConfig allows retries, yet the workers run once and the fit ends without an error,
rank 0's report carrying the reason for the trial to fail its run."""
from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.ray


def test_a_replaced_probe_set_is_refused_once_not_retried(local_ray, builtin_probe_dir, tmp_path):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.callback import UserCallback

    from probes.probe_set import ProbeSet
    from trainers.config import TrainConfig
    from trainers.runs.worker_entry import train_loop_per_worker

    out = tmp_path / "reports.txt"

    class WriteReports(UserCallback):  # nested: shipped by value to the Train controller (one machine: a file)
        def after_report(self, run_context, metrics, checkpoint):
            from trainers.runs.worker_report import report_of

            with open(out, "a") as sink:
                for rank, reported in enumerate(metrics):
                    report = report_of(reported)
                    sink.write(f"rank {rank}: {report.refused if report else reported}\n")

    found = ProbeSet.load(builtin_probe_dir).content_hash()
    recorded = "0" * len(found)   # the hash the run recorded: another set than the one at the path now
    train = TrainConfig(model="tiny-pythia-1m", probe_set_dir=builtin_probe_dir, num_probe_prompts=2,
                        max_train_pairs=16, micro_batch_size=2, max_steps=2, num_workers=2, cpus_per_worker=0.5)
    trainer = TorchTrainer(train_loop_per_worker,
                           train_loop_config={"train": train, "final_model_dir": None, "probe_set_hash": recorded},
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(name="refused", storage_path=str(tmp_path / "runs"),
                                                failure_config=FailureConfig(max_failures=2), callbacks=[WriteReports()]))
    trainer.fit()  # before: each attempt raised ProbeSetMismatch, retried twice, then TrainingFailedError
    reports = out.read_text().splitlines()
    assert len(reports) == 2, reports  # one report per rank, once: no retry
    assert reports[0].startswith(f"rank 0: probe set {builtin_probe_dir} has content hash {found}, but this run "
                                 f"recorded {recorded}")
    assert reports[1] == "rank 1: {'step': 0}"
