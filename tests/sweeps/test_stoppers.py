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
