"""Search spaces, schedulers and per-trial settings: what Tune receives for a given sweep config."""
from __future__ import annotations

from dataclasses import replace

import pytest
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from sweeps.config import SweepConfig, parse_config
from sweeps.context import TrialContext
from sweeps.search import reuses_trial_processes, search_space, searched_values, tune_settings, warmup_key
from sweeps.stages import trial_resources
from sweeps.trial import trial_run_name, trial_settings, worker_resources
from trainers.config import TrainConfig


def test_grid_space_is_every_combination_and_skips_unset_keys():
    space = search_space(SweepConfig(), {"beta": [0.1, 0.5], "lr": [1e-4], "seed": None, "loss": []})
    assert space == {"beta": {"grid_search": [0.1, 0.5]}, "lr": {"grid_search": [1e-4]}}
    assert searched_values(space) == {"beta": [0.1, 0.5], "lr": [1e-4]}


@pytest.mark.parametrize("search", ["random", "optuna"])
def test_sampled_searches_get_choices_not_grids(search):
    space = search_space(SweepConfig(search=search), {"beta": [0.1, 0.5, 0.9], "model": ["tiny-pythia-1m"]})
    assert all(isinstance(domain, tune.search.sample.Categorical) for domain in space.values())
    assert searched_values(space) == {"beta": [0.1, 0.5, 0.9], "model": ["tiny-pythia-1m"]}


def test_unknown_search_key_is_an_error():
    with pytest.raises(ValueError, match="cannot search over \\['warmup_steps'\\]"):
        search_space(SweepConfig(), {"warmup_steps": [1, 2]})


def test_asha_uses_steps_as_time_and_the_chosen_metric():
    config = SweepConfig(scheduler="asha", metric="dpo/reward_accuracy", mode="max", num_samples=3,
                         train=TrainConfig(max_steps=40, eval_every=10))
    settings = tune_settings(config)
    scheduler = settings["scheduler"]
    assert isinstance(scheduler, ASHAScheduler)
    assert (scheduler._time_attr, scheduler._metric, scheduler._mode, scheduler._max_t) == ("step", "dpo/reward_accuracy", "max", 40)
    assert settings["num_samples"] == 3 and settings["search_alg"] is None
    assert tune_settings(SweepConfig())["scheduler"] is None


def test_optuna_search_algorithm_or_a_clear_message():
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="probesweep\\[optuna\\]"):
            tune_settings(SweepConfig(search="optuna"))
    else:
        from ray.tune.search.optuna import OptunaSearch
        assert isinstance(tune_settings(SweepConfig(search="optuna"))["search_alg"], OptunaSearch)


def test_worker_shares_parse_and_reject_malformed_entries():
    config = parse_config(["--worker-shares", "tiny-pythia-1m=0.2", "org/model=v2=1"], "")
    assert config.worker_share_by_model() == {"tiny-pythia-1m": 0.2, "org/model=v2": 1.0}
    for bad in ("tiny-pythia-1m", "=0.3", "tiny-pythia-1m=0", "tiny-pythia-1m=lots"):
        with pytest.raises(ValueError, match="MODEL=SHARE"):
            SweepConfig(worker_shares=[bad]).worker_share_by_model()


def test_worker_resources_and_trial_placement_reach_ray():
    config = parse_config(["--worker-resources", "trainer=1", "accelerator_type:A10G=0.5"], "")
    assert config.worker_resource_requests() == {"trainer": 1.0, "accelerator_type:A10G": 0.5}
    with pytest.raises(ValueError, match="RESOURCE=AMOUNT"):
        SweepConfig(worker_resources=["trainer=-1"]).worker_resource_requests()
    ctx = replace(CTX, worker_resources=config.worker_resource_requests())
    assert worker_resources(TrainConfig(cpus_per_worker=0.4), ctx) == {"CPU": 0.4, "trainer": 1.0, "accelerator_type:A10G": 0.5}
    assert worker_resources(TrainConfig(use_gpu=True, gpus_per_worker=0.5), CTX) == {"GPU": 0.5}
    # trial processes sit on the head node (which Ray marks with its own resource) unless told otherwise
    assert trial_resources(SweepConfig()) == {"cpu": 0.01, "node:__internal_head__": 0.001}
    assert trial_resources(parse_config(["--trials-on-head", "false"], "")) == {"cpu": 0.01}


CTX = TrialContext(tracking_uri="", experiment_id="", parent_run_id="", storage_path="", sweep_name="s", max_failures=0,
                   probe_set_hash="", categories=(),
                   init_checkpoints={warmup_key("tiny-pythia-1m", "chosen"): "/warm/1m-chosen",
                                     warmup_key("tiny-pythia-1m", "both"): "/warm/1m-both",
                                     warmup_key("tiny-pythia-4m", "chosen"): "/warm/4m-chosen"},
                   worker_shares={"tiny-pythia-4m": 0.7})


def test_trial_settings_pick_the_warmup_of_model_and_recipe_and_the_model_share():
    base = TrainConfig(model="tiny-pythia-1m", cpus_per_worker=0.3)
    one = trial_settings(base, {"beta": 0.5, "sft_recipe": "both"}, CTX)
    assert (one.beta, one.init_checkpoint, one.cpus_per_worker, one.sft_recipe) == (0.5, "/warm/1m-both", 0.3, "both")
    four = trial_settings(base, {"model": "tiny-pythia-4m"}, CTX)
    assert (four.init_checkpoint, four.cpus_per_worker) == ("/warm/4m-chosen", 0.7)
    on_gpu = trial_settings(replace(base, use_gpu=True), {"model": "tiny-pythia-4m"}, CTX)
    assert (on_gpu.gpus_per_worker, on_gpu.cpus_per_worker) == (0.7, 0.3)


def test_warmup_trials_train_on_their_recipe():
    sft = TrainConfig(loss="sft")
    warmup = replace(CTX, stage="sft-warmup", init_checkpoints={})
    assert trial_settings(sft, {"sft_recipe": "both"}, warmup).sft_recipe == "both"
    assert trial_settings(replace(sft, sft_recipe="both"), {}, warmup).sft_recipe == "both"


def test_run_names_say_what_differs():
    assert trial_run_name(TrainConfig(loss="dpo"), {"sft_recipe": "both", "beta": 0.1, "model": "tiny-pythia-4m", "lr": 5e-6}) == \
        "beta=0.1 lr=5e-06 model=tiny-pythia-4m sft_recipe=both"
    assert trial_run_name(TrainConfig(loss="sft"), {}) == "sft"


def test_a_file_store_on_a_cluster_gets_a_warning(capsys):
    from sweeps.driver import warn_if_store_is_node_local

    assert warn_if_store_is_node_local("sqlite:////tmp/x/mlflow.db", "auto")
    assert "--tracking-uri http://" in capsys.readouterr().err
    assert warn_if_store_is_node_local("mlruns", "10.0.0.1:6379")
    assert not warn_if_store_is_node_local("http://10.0.0.1:5000", "auto")
    assert not warn_if_store_is_node_local("sqlite:////tmp/x/mlflow.db", None)  # one machine: the default is right


def test_trial_processes_are_reused_only_where_every_trial_runs_to_its_end():
    assert tune_settings(SweepConfig())["reuse_actors"] is True
    assert not reuses_trial_processes(SweepConfig(scheduler="asha"))
    assert not reuses_trial_processes(SweepConfig(stop_fall_from_peak=0.5))
