"""Shared fixtures. Ray is started at most once per module that needs it (start-up costs seconds): `local_ray`."""
from __future__ import annotations

import os

import pytest

# before anything imports Ray: one machine, loopback only
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# no hub is reachable from test machines: fail at once instead of retrying for a minute
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tokenizers and probe sets built by tests go to a temporary cache, not the user's."""
    previous = os.environ.get("PROBESWEEP_CACHE")
    os.environ["PROBESWEEP_CACHE"] = str(tmp_path_factory.mktemp("probesweep-cache"))
    yield
    if previous is None:
        os.environ.pop("PROBESWEEP_CACHE", None)
    else:
        os.environ["PROBESWEEP_CACHE"] = previous


@pytest.fixture(scope="session")
def builtin_probe_dir(tmp_path_factory):
    """A small probe set from the built-in test split, saved once for the session."""
    from probes.builtin_generators import RuleBasedGenerator
    from probes.probe_set import build_probe_set
    from trainers.data.pairs import load_preference_data

    pairs = load_preference_data("builtin", "test").pairs
    probe_set = build_probe_set(pairs, RuleBasedGenerator(), n_prompts=8, seed=0, source="builtin:test")
    directory = tmp_path_factory.mktemp("probes")
    probe_set.save(directory)
    return str(directory)


@pytest.fixture(scope="module")
def local_ray():
    """A fresh local Ray on loopback (2 CPUs, no dashboard) for the tests of one module, shut down after them.

    The one copy of the tests' `ray.init`; sweeps start their own through `sweeps.driver.start_ray`."""
    import ray

    if ray.is_initialized():  # left over by an earlier module: start clean
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
