"""`python -m probes.build`: the CLI, the local fallbacks, the saved set, and that the key leaks nowhere."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fake_gemini import FakeGemini, Refusal, Sleep, Status
from probes.build import BuildConfig, ProbeBuildError, build, main
from probes.builtin_generators import RuleBasedGenerator
from probes.gemini import GeminiError
from probes.probe_set import STATIC_CATEGORIES, ProbeSet, build_probe_set, select_pairs
from probes.reply_cache import CACHE_FILE
from probes.templates import PromptTemplates, load_templates
from probes.validation import ValidationRules, reject_reason
from trainers.data.pairs import load_preference_data

REPO = Path(__file__).resolve().parents[2]
KEY = "AIzaFAKE-never-log-me-5d2a7f19c3"


def local_config(tmp_path, name="out", **overrides) -> BuildConfig:
    values = dict(output=str(tmp_path / name), cache_dir=str(tmp_path / "cache"), num_prompts=6, progress=False)
    values.update(overrides)
    return BuildConfig(**values)


def test_help_runs():
    done = subprocess.run([sys.executable, "-m", "probes.build", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    for flag in ("--dataset", "--split", "--num-prompts", "--output", "--generator", "--model-name", "--templates",
                 "--max-requests", "--concurrency", "--seed"):
        assert flag in done.stdout


def test_without_a_key_auto_builds_the_builtin_data_locally(tmp_path):
    result = build(local_config(tmp_path, generator="auto"), environ={})
    manifest = result.manifest
    assert manifest["build"]["generator"] == "local"
    assert manifest["generators"] == {
        "chosen": "data", "rejected": "data", "paraphrase_chosen": "builtin-rules",
        "paraphrase_rejected": "builtin-rules", "variant": "builtin-rules", "random": "derangement",
        "nonresponse": "builtin-sentences"}
    assert manifest["build"]["dataset"] == "builtin" and manifest["build"]["split"] == "test"
    assert manifest["source"] == "builtin:test"
    assert manifest["build"]["prompt_templates"] is None and manifest["build"]["model_name"] is None
    assert all(r["failed"] == 0 for r in manifest["build"]["failures"].values())
    loaded = ProbeSet.load(result.directory)
    assert loaded == result.probe_set
    assert manifest["content_hash"] == loaded.content_hash()
    again = build(local_config(tmp_path, name="again", generator="local"), environ={})
    assert again.probe_set.content_hash() == loaded.content_hash()       # stable
    assert not (tmp_path / "cache").exists()                             # no LLM, no reply cache


def test_the_builtin_generator_gives_the_same_set_as_build_probe_set(tmp_path):
    pairs = load_preference_data("builtin", "test").pairs
    expected = build_probe_set(pairs, RuleBasedGenerator(), n_prompts=6, seed=3, source="builtin:test")
    result = build(local_config(tmp_path, generator="builtin", seed=3), environ={"GEMINI_API_KEY": KEY})
    assert result.probe_set.content_hash() == expected.content_hash()
    assert result.manifest["generators"]["nonresponse"] == "builtin-rules"


def test_gemini_without_a_key_is_a_clear_error(tmp_path):
    with pytest.raises(GeminiError, match="GEMINI_API_KEY"):
        build(local_config(tmp_path, generator="gemini"), environ={})


def test_a_different_probe_set_in_the_output_folder_is_not_replaced(tmp_path):
    build(local_config(tmp_path, generator="builtin"), environ={})
    build(local_config(tmp_path, generator="builtin"), environ={})            # the same set again: fine
    with pytest.raises(ProbeBuildError, match="already holds a different probe set"):
        build(local_config(tmp_path, generator="builtin", seed=1), environ={})
    replaced = build(local_config(tmp_path, generator="builtin", seed=1, overwrite=True), environ={})
    assert ProbeSet.load(tmp_path / "out").content_hash() == replaced.probe_set.content_hash()


@pytest.fixture
def one_torch_thread():
    """Tiny models generate fastest on one thread; on a busy 2-core machine two threads can be 10x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_a_local_language_model_writes_paraphrases_and_variants_for_other_data(tmp_path, one_torch_thread):
    rows = [{"prompt": f"\n\nHuman: How do I look after plant number {i}?\n\nAssistant:",
             "chosen": f" Water plant {i} once a week and give it light.", "rejected": f" Plant {i} is boring."}
            for i in range(60)]  # a local file's probes come from its held-out share (--holdout-fraction, 10%)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = build(local_config(tmp_path, dataset=str(data), generator="local", local_model="tiny-pythia-1m",
                                local_max_new_tokens=12, num_prompts=4, max_attempts=2, max_failure_fraction=1.0), environ={})
    generators = result.manifest["generators"]
    assert generators["paraphrase_chosen"] == generators["variant"] == "local-lm:tiny-pythia-1m"
    assert generators["nonresponse"] == "builtin-sentences"
    assert result.manifest["build"]["writers"]["local-lm:tiny-pythia-1m"]["model"] == "tiny-pythia-1m"
    probe_set = ProbeSet.load(result.directory)
    assert len(probe_set.prompts) >= 2
    rules = ValidationRules()
    for category in ("paraphrase_chosen", "paraphrase_rejected", "variant"):
        for text in probe_set.responses[category]:
            assert text.startswith(" ") and reject_reason(text, "", rules) is None


def test_templates_come_from_yaml_and_are_checked(tmp_path):
    path = tmp_path / "templates.yaml"
    path.write_text("max_words: 30\nparaphrase: 'Say it again in {max_words} words: {text}'\n", encoding="utf-8")
    templates = load_templates(path)
    assert templates.max_words == 30 and templates.variant == PromptTemplates().variant
    path.write_text("paraphrase: 'Say {text} to {someone}'\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"templates.yaml: template 'paraphrase' uses unknown field\(s\) \['someone'\]"):
        load_templates(path)
    path.write_text("variant: 'Answer something.'\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"must contain \{prompt\}"):
        load_templates(path)
    path.write_text("paraphrasing: 'x {text}'\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown key"):
        load_templates(path)


@pytest.mark.parametrize("text,source,reason", [
    ("", "Water it.", "empty"),
    ("   ", "Water it.", "empty"),
    ("I'm sorry, but I cannot rewrite this.", "Water it weekly.", "refusal"),
    ("As an AI, I have no plants.", "Water it weekly.", "refusal"),
    ("Sorry, I can\u2019t help.", "Water it weekly.", "refusal"),
    ("  WATER it   weekly. ", "Water it weekly.", "identical"),
    ("\"Water it weekly.\"", "Water it weekly.", "identical"),
    (" ".join(["word"] * 76), "Water it weekly.", "too_long"),
    ("Give it water.\n\nHuman: thanks", "Water it weekly.", "turn_marker"),
    ("Assistant: Give it water.", "Water it weekly.", "turn_marker"),
    ("Give it water.\nUser: ok", "Water it weekly.", "turn_marker"),
    ("Give it some water every week.", "Water it weekly.", None),
    (" ".join(["word"] * 75), "Water it weekly.", None),
    ("I'm afraid I can't help with that request.", "Water it weekly.", "refusal"),
    ("We cannot rewrite this text. It is private.", "Water it weekly.", "refusal"),
    ("Unfortunately, I don't know.", "I have no idea.", None),           # a faithful paraphrase, not a refusal
    ("Sorry, I can't help with that.", "I won't help you with this.", None),   # the source refuses too
    ("I can't say it better: water it weekly.", "Water it every week.", None),
])
def test_validation_rules(text, source, reason):
    assert reject_reason(text, source, ValidationRules(max_words=50, length_slack=1.5)) == reason


def test_the_key_appears_in_no_file_log_or_output(tmp_path, monkeypatch, capfd, caplog):
    """A CLI build with retries and rejections, logged to MLflow: grep every byte written for the key."""
    from infra.tracking import Tracker, default_tracking_uri

    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    pairs = select_pairs(load_preference_data("builtin", "test").pairs, 4, 0)[0]
    caplog.set_level(logging.DEBUG)
    uri = default_tracking_uri(tmp_path / "mlflow")
    (tmp_path / "mlflow").mkdir()
    with FakeGemini() as fake:
        fake.script(pairs[0].chosen.strip(), Status(429, message=f"quota for key {KEY}"), Refusal())
        fake.script(pairs[1].rejected.strip(), Status(500), Sleep(3.0))
        code = main(["--dataset", "builtin", "--split", "test", "--num-prompts", "4", "--output",
                     str(tmp_path / "out"), "--generator", "gemini", "--base-url", fake.base_url, "--cache-dir",
                     str(tmp_path / "cache"), "--backoff-initial", "0.01", "--timeout", "0.5",
                     "--tracking-uri", uri, "--experiment-name", "probe-build-test"])
        assert {s.api_key for s in fake.seen} == {KEY}                    # the key was really used
    out, err = capfd.readouterr()
    assert code == 0, err
    assert "probe set " in out and "requests sent" in out

    tracker = Tracker(uri)
    experiment = tracker.client.get_experiment_by_name("probe-build-test")
    (run,) = tracker.client.search_runs([experiment.experiment_id])
    assert run.data.params["model_name"] == "gemini-2.5-flash"
    assert run.data.params["generator"] == "gemini"
    assert run.data.tags["probe_set_hash"] == json.loads((tmp_path / "out" / "manifest.json").read_text())["content_hash"]
    artifacts = {a.path for a in tracker.client.list_artifacts(run.info.run_id, "probe_set")}
    assert artifacts == {"probe_set/manifest.json", "probe_set/probes.jsonl"}

    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"mlflow.db", "manifest.json", "probes.jsonl", CACHE_FILE} <= names
    assert len([p for p in files if p.name == "manifest.json"]) == 2          # output + MLflow artifact copy
    leaks = [str(p.relative_to(tmp_path)) for p in files if KEY.encode() in p.read_bytes()]
    assert leaks == []
    assert KEY not in out and KEY not in err
    assert caplog.records and KEY not in caplog.text
    assert all(KEY not in str(r.args) for r in caplog.records)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["build"]["key_variable"] == "GEMINI_API_KEY"          # where it came from, not what it is
    assert manifest["build"]["failures"]["paraphrase_chosen"]["rejected_replies"] == {"refusal": 1}


def test_budget_exit_code_and_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    with FakeGemini() as fake:
        code = main(["--num-prompts", "4", "--output", str(tmp_path / "out"), "--generator", "gemini", "--base-url",
                     fake.base_url, "--cache-dir", str(tmp_path / "cache"), "--max-requests", "3", "--no-progress"])
        assert fake.count() == 3
    assert code == 3
    assert "budget used up: 3 requests" in capsys.readouterr().err


def test_ctrl_c_keeps_every_reply_and_the_rerun_sends_nothing_twice(tmp_path):
    """A real SIGINT to a build in a subprocess; then the same build in-process finishes from the cache."""
    with FakeGemini() as fake:
        fake.script("", *[Sleep(0.25)] * 16)          # every request is slow
        args = ["--num-prompts", "4", "--output", str(tmp_path / "out"), "--generator", "gemini", "--base-url",
                fake.base_url, "--cache-dir", str(tmp_path / "cache"), "--concurrency", "2", "--no-progress"]
        env = {**os.environ, "GEMINI_API_KEY": KEY, "PYTHONPATH": str(REPO)}
        process = subprocess.Popen([sys.executable, "-m", "probes.build", *args], cwd=REPO, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while fake.count() < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
        assert process.returncode == 130, err
        assert "interrupted" in err and KEY not in err
        sent = fake.count()
        assert 4 <= sent < 16
        stored = (tmp_path / "cache" / CACHE_FILE).read_text(encoding="utf-8").splitlines()
        assert len(stored) == sent                                    # the requests in flight were kept too
        os.environ["GEMINI_API_KEY"] = KEY
        try:
            assert main(args) == 0
        finally:
            del os.environ["GEMINI_API_KEY"]
        assert fake.count() == 16
        assert set(fake.counts().values()) == {1}
    assert len(ProbeSet.load(tmp_path / "out").prompts) == 4
    assert set(ProbeSet.load(tmp_path / "out").categories) == set(STATIC_CATEGORIES)
