"""The fall-from-peak stopper on hand-made result streams (the stream Tune passes it, one dict per report)."""
import pytest

from sweeps.stoppers import FallFromPeakStopper


def test_stops_once_the_metric_has_fallen_far_enough_below_its_own_peak():
    stopper = FallFromPeakStopper(drop=3.0)
    stream = [{"step": 0, "logp/chosen": -40.0}, {"step": 5, "train/loss": 0.6},  # no metric: ignored
              {"step": 10, "logp/chosen": -36.0}, {"step": 20, "logp/chosen": -38.5},
              {"step": 30, "logp/chosen": -39.0}]
    assert [stopper("a", r) for r in stream] == [False, False, False, False, True]
    # another trial's curve is its own: -39 is not below ITS peak
    assert stopper("b", {"step": 0, "logp/chosen": -39.0}) is False
    assert stopper.stop_all() is False


def test_other_metric_and_bad_drop():
    stopper = FallFromPeakStopper(drop=0.5, metric="logp/rejected")
    assert stopper("t", {"logp/rejected": -10.0, "logp/chosen": -99.0}) is False
    assert stopper("t", {"logp/rejected": -10.6}) is True
    with pytest.raises(ValueError, match="drop must be > 0"):
        FallFromPeakStopper(drop=0)


# --stop-fall-from-peak / --stop-metric: parsed by the one parser builder, checked at parse time, built into
# the stopper the sweep stage's Tune RunConfig gets (sweeps.stages.run_stage passes trial_stopper(config) as `stop`)

def test_flag_builds_the_stopper_with_its_values():
    from sweeps.config import parse_config
    from sweeps.search import trial_stopper

    config = parse_config(["--stop-fall-from-peak", "2.5", "--stop-metric", "logp_tok/paraphrase_chosen"])
    stopper = trial_stopper(config)
    assert isinstance(stopper, FallFromPeakStopper)
    assert (stopper.drop, stopper.metric) == (2.5, "logp_tok/paraphrase_chosen")
    assert stopper("t", {"step": 0, "logp_tok/paraphrase_chosen": -1.0}) is False
    assert stopper("t", {"step": 9, "logp_tok/paraphrase_chosen": -3.5}) is True
    default = trial_stopper(parse_config(["--stop-fall-from-peak", "1"]))
    assert (default.drop, default.metric) == (1.0, "logp/chosen")
    assert trial_stopper(parse_config([])) is None  # no flag: trials run to max_steps


def test_flag_from_a_yaml_config(tmp_path):
    from sweeps.config import parse_config
    from sweeps.search import trial_stopper

    path = tmp_path / "sweep.yaml"
    path.write_text("stop_fall_from_peak: 0.75\nstop_metric: logp/rejected\n")
    stopper = trial_stopper(parse_config(["--config", str(path)]))
    assert (stopper.drop, stopper.metric) == (0.75, "logp/rejected")


@pytest.mark.parametrize("argv, named", [
    (["--stop-fall-from-peak", "0"], "--stop-fall-from-peak"),
    (["--stop-fall-from-peak", "-2"], "--stop-fall-from-peak"),
    (["--stop-fall-from-peak", "nan"], "--stop-fall-from-peak"),
    (["--stop-fall-from-peak", "inf"], "--stop-fall-from-peak"),
    (["--stop-fall-from-peak", "two"], "--stop-fall-from-peak"),
    (["--stop-fall-from-peak", "1", "--stop-metric", "train/loss"], "--stop-metric"),
])
def test_bad_values_are_refused_in_one_line_naming_the_flag(argv, named, capsys):
    from sweeps.config import parse_config

    with pytest.raises(SystemExit) as stopped:
        parse_config(argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and named in error and "Traceback" not in error


@pytest.mark.ray
def test_real_tune_run_stops_where_the_flag_says(local_ray, tmp_path):
    """The stopper the flag builds, as the `stop` of a real Tune RunConfig (what sweeps.stages.run_stage
    passes): the trial ends at the first report 3 nats below its peak, the other trial runs to the end."""
    from ray import tune

    from sweeps.config import parse_config
    from sweeps.search import trial_stopper

    curves = {"falls": [-40.0, -36.0, -37.0, -38.5, -39.5, -45.0, -50.0], "rises": [-40.0, -39.0, -38.0, -37.0]}

    def trainable(config):
        for index, value in enumerate(curves[config["curve"]]):
            tune.report({"step": index * 10, "logp/chosen": value})

    stopper = trial_stopper(parse_config(["--stop-fall-from-peak", "3"]))
    results = tune.Tuner(trainable, param_space={"curve": tune.grid_search(sorted(curves))},
                         run_config=tune.RunConfig(storage_path=str(tmp_path), name="stop", verbose=0, stop=stopper)).fit()
    last = {r.config["curve"]: (r.metrics["step"], r.metrics["logp/chosen"]) for r in results}
    assert last == {"falls": (40, -39.5), "rises": (30, -37.0)}


@pytest.mark.ray
def test_a_trial_tune_stopped_reads_stopped_and_a_running_one_does_not(local_ray, tmp_path):
    """sweeps.trial.tune_stopped on a real Tune run. Each trial has a sweep trial's shape: its thread waits
    on an actor (the Train controller's place) that sends the report through the Tune session's
    inter-actor queue, as Ray Train's TuneReportCallback does. The stopper ends both trials at that report;
    Tune removes their placement groups, the actor dies and the wait fails, which sweeps/trial.py must not
    record as the trial's failure. A watcher thread writes what tune_stopped says before and after."""
    import json
    import threading
    import time

    import ray
    from ray import tune

    from sweeps.trial import tune_stopped

    out = tmp_path / "watch.jsonl"

    def trainable(config):
        from ray.train._internal.session import get_session

        from sweeps.trial import tune_session, tune_stopped

        session = tune_session()

        def watch():
            with open(config["out"], "a") as handle:
                handle.write(json.dumps({"trial": config["i"], "before": tune_stopped(session)}) + "\n")
            deadline = time.time() + 60
            while time.time() < deadline and not tune_stopped(session):
                time.sleep(0.001)
            with open(config["out"], "a") as handle:
                handle.write(json.dumps({"trial": config["i"], "after": tune_stopped(session)}) + "\n")

        @ray.remote(num_cpus=0)
        class Reporter:
            def run(self, queue):
                queue.put({"x": 1})
                time.sleep(60)

        queue = get_session()._get_or_create_inter_actor_queue()
        threading.Thread(target=watch, daemon=True).start()
        ray.get(Reporter.remote().run.remote(queue))

    results = tune.Tuner(tune.with_resources(trainable, {"cpu": 0.01}),
                         param_space={"i": tune.grid_search([0, 1]), "out": str(out)},
                         tune_config=tune.TuneConfig(max_concurrent_trials=2, reuse_actors=False),
                         run_config=tune.RunConfig(stop=lambda trial_id, result: result.get("x") == 1,
                                                   storage_path=str(tmp_path / "tune"), verbose=0)).fit()
    assert [r.error for r in results] == [None, None]  # Tune counts both as stopped, not failed
    deadline = time.time() + 30  # the watcher writes from the trial's process, which may outlive fit()
    while time.time() < deadline and len(out.read_text().splitlines()) < 4:
        time.sleep(0.2)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["trial"], r["before"]) for r in rows if "before" in r) == [(0, False), (1, False)]
    assert sorted((r["trial"], r["after"]) for r in rows if "after" in r) == [(0, True), (1, True)]
    assert tune_stopped(None) is False  # outside Tune (no session) nothing is ever "stopped"
