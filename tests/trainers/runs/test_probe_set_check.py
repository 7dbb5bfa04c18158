"""A worker compares the probe set it loads with the hash its run recorded and fails loudly on a mismatch
(a set replaced at the same path after the sweep started), naming the folder and both hashes."""
from __future__ import annotations

import shutil

import pytest

from probes.builtin_generators import RuleBasedGenerator
from probes.probe_set import ProbeSet, cached_probe_set_dir
from trainers.data.pairs import load_preference_data
from trainers.runs.evaluation import ProbeSetMismatch, check_probe_set


def test_a_probe_set_replaced_after_the_run_recorded_it_is_refused(tmp_path):
    pairs = load_preference_data("builtin", "test").pairs
    first = cached_probe_set_dir(tmp_path / "builds", pairs, RuleBasedGenerator(), 4, 0, "builtin:test")
    other = cached_probe_set_dir(tmp_path / "builds", pairs, RuleBasedGenerator(), 4, 1, "builtin:test")  # another seed
    recorded = ProbeSet.load(first).content_hash()
    used = tmp_path / "probe_set"
    shutil.copytree(first, used)
    check_probe_set(used, recorded)  # the recorded set: passes
    check_probe_set(used, None)      # nothing recorded (a bare run): nothing to compare
    shutil.rmtree(used)
    shutil.copytree(other, used)     # replaced at the same path: a valid set, but not this run's
    with pytest.raises(ProbeSetMismatch) as error:
        check_probe_set(used, recorded)
    found = ProbeSet.load(used).content_hash()
    assert found != recorded and str(used) in str(error.value)
    assert f"content hash {found}, but this run recorded {recorded}" in str(error.value)
