"""The Gemini writer through the real google-genai client against a local fake server (127.0.0.1).

Every failure mode of the service is scripted per request; the fake server's request log shows what
was sent, so retries, the budget and resume are checked by counting requests per prompt.
"""
from __future__ import annotations

import json
import threading
import time

import pytest

from fake_gemini import (FakeGemini, Malformed, NoCandidates, PromptBlocked, Refusal, SafetyBlocked, Sleep, Status,
                         Text)
from probes.build import BuildConfig, ProbeBuildError, build
from probes.gemini import BudgetExhausted, GeminiError, GeminiOptions, GeminiReplies, api_key_from_env, redact
from probes.probe_set import ProbeSet, select_pairs
from probes.reply_cache import CACHE_FILE, ReplyCache, request_key
from probes.templates import DERIVED_CATEGORIES, ProbeRequest, PromptTemplates
from trainers.data.pairs import load_preference_data

KEY = "AIzaFAKE-test-key-7c1e9b0d42"
N = 4


@pytest.fixture
def fake():
    with FakeGemini() as server:
        yield server


@pytest.fixture(scope="module")
def picked():
    """The pairs a build with N prompts and seed 0 selects from the built-in test split."""
    return select_pairs(load_preference_data("builtin", "test").pairs, N, 0)[0]


def make_config(tmp_path, fake, **overrides) -> BuildConfig:
    values = dict(output=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), generator="gemini",
                  base_url=fake.base_url, num_prompts=N, backoff_initial_s=0.01, backoff_max_s=0.05,
                  timeout_s=2.0, concurrency=2, progress=False)
    values.update(overrides)
    return BuildConfig(**values)


def run(tmp_path, fake, **overrides):
    return build(make_config(tmp_path, fake, **overrides), environ={"GEMINI_API_KEY": KEY})


def cache_lines(tmp_path) -> list[str]:
    return (tmp_path / "cache" / CACHE_FILE).read_text(encoding="utf-8").splitlines()


def test_the_real_client_posts_to_generate_content_with_the_key_in_a_header(tmp_path, fake, picked):
    result = run(tmp_path, fake)
    assert fake.count() == 4 * N
    assert {s.path for s in fake.seen} == {"/v1/models/gemini-2.5-flash:generateContent"}
    assert {s.api_key for s in fake.seen} == {KEY}
    probe_set = result.probe_set
    assert len(probe_set.prompts) == N
    for category in DERIVED_CATEGORIES:
        assert all(text.startswith(" A freshly written sentence") for text in probe_set.responses[category])
        assert result.manifest["generators"][category] == "gemini:gemini-2.5-flash"
    # each paraphrase request carries its own source text, the rejected one for paraphrase_rejected
    for pair in picked:
        assert fake.count(pair.rejected.strip()) == 1
    assert result.manifest["build"]["usage"]["requests_sent"] == 4 * N
    assert result.manifest["build"]["usage"]["estimated_cost_usd"] > 0


@pytest.mark.parametrize("answer", [Status(429), Status(500), Status(503), Sleep(6.0), Malformed()],
                         ids=["429", "500", "503", "timeout", "malformed"])
def test_transient_failures_are_retried_and_then_succeed(tmp_path, fake, picked, answer):
    source = picked[1].chosen.strip()
    fake.script(source, answer)
    result = run(tmp_path, fake, timeout_s=0.5)
    assert fake.count(source) == 2
    assert fake.count() == 4 * N + 1
    sent = fake.requests_for(source)
    assert sent[0].generation_config == sent[1].generation_config   # a transport retry repeats the request
    assert sent[1].at - sent[0].at < 4.0       # for the timeout: the client gave up long before the 6 s reply
    assert result.manifest["build"]["failures"]["paraphrase_chosen"]["failed"] == 0
    assert result.probe_set.responses["paraphrase_chosen"][1].startswith(" A freshly written sentence")


def test_retry_after_is_honoured(tmp_path, fake, picked):
    source = picked[0].rejected.strip()
    fake.script(source, Status(429, retry_after="1"))
    run(tmp_path, fake)
    first, second = fake.requests_for(source)
    assert second.at - first.at >= 0.95       # backoff alone would have waited at most 0.05 s


@pytest.mark.parametrize("answer,reason", [
    (NoCandidates(), "empty"),
    (SafetyBlocked(), "blocked"),
    (PromptBlocked(), "blocked"),
    (Refusal(), "refusal"),
    ("identical", "identical"),
    (Text(" ".join(["word"] * 80)), "too_long"),
    (Text("Sure thing.\n\nHuman: and then?\n\nAssistant: more"), "turn_marker"),
    (Text("A reply cut off in the mid", finish_reason="MAX_TOKENS"), "truncated"),
], ids=["no-candidates", "safety", "prompt-blocked", "refusal", "identical", "too-long", "turn-marker", "truncated"])
def test_rejected_replies_are_asked_for_again_with_another_seed(tmp_path, fake, picked, answer, reason):
    source = picked[2].chosen.strip()
    if answer == "identical":
        answer = Text("  " + source.upper() + " ")     # the same text up to case and whitespace
    fake.script(source, answer)
    result = run(tmp_path, fake)
    first, second = fake.requests_for(source)
    assert second.generation_config["seed"] != first.generation_config["seed"]
    assert second.generation_config["temperature"] > first.generation_config["temperature"]
    failures = result.manifest["build"]["failures"]["paraphrase_chosen"]
    assert failures["rejected_replies"] == {reason: 1}
    assert failures["failed"] == 0
    assert result.probe_set.responses["paraphrase_chosen"][2].startswith(" A freshly written sentence")
    # the rejected reply was cached under its own attempt's key: a rerun asks for nothing
    run(tmp_path, fake, overwrite=True)
    assert fake.count(source) == 2


def test_a_refusal_is_accepted_when_the_source_is_one(tmp_path, fake, picked):
    # HH-style rejected answers are often refusals; their paraphrase may be one too
    from probes.validation import ValidationRules, reject_reason

    rules = ValidationRules()
    assert reject_reason("I'm sorry, I cannot do that.", "Sorry, I can't help with that.", rules) is None
    assert reject_reason("I'm sorry, I cannot do that.", "Water the plant weekly.", rules) == "refusal"


def test_a_probe_that_keeps_failing_drops_its_prompt(tmp_path, fake, picked):
    source = picked[3].rejected.strip()
    fake.script(source, Refusal(), Refusal(), Refusal())
    result = run(tmp_path, fake, max_failure_fraction=0.5)
    assert fake.count(source) == 3                                    # max_attempts
    build_info = result.manifest["build"]
    assert build_info["failures"]["paraphrase_rejected"] == {
        "failed": 1, "of": N, "final_reasons": {"refusal": 1}, "rejected_replies": {"refusal": 3}}
    assert build_info["dropped_prompts"] == [{"position": 3, "source_row": picked[3].row}]
    probe_set = ProbeSet.load(result.directory)
    assert list(probe_set.prompts) == [p.prompt for p in picked[:3]]
    assert all(len(probe_set.responses[c]) == 3 for c in probe_set.categories)
    assert result.manifest["counts"]["prompts"] == 3


def test_too_many_failures_refuse_the_probe_set(tmp_path, fake, picked):
    fake.script(picked[0].chosen.strip(), Refusal(), Refusal())
    with pytest.raises(ProbeBuildError) as caught:
        run(tmp_path, fake, max_attempts=2, max_failure_fraction=0.2)
    message = str(caught.value)
    assert "'paraphrase_chosen': 1 of 4 probes failed" in message and "refusal 1" in message
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_request_that_stays_unavailable_is_a_failure(tmp_path, fake, picked):
    source = picked[0].chosen.strip()
    fake.script(source, *[Status(503)] * 3)
    result = run(tmp_path, fake, max_retries=2, max_attempts=1, max_failure_fraction=0.5)
    assert fake.count(source) == 3
    assert result.manifest["build"]["failures"]["paraphrase_chosen"]["final_reasons"] == {"unavailable": 1}
    assert len(result.probe_set.prompts) == N - 1


def test_a_refused_key_stops_the_build_without_showing_the_key(tmp_path, fake, picked):
    fake.script(picked[0].chosen.strip(), Status(403, message=f"API key {KEY} not valid"))
    with pytest.raises(GeminiError) as caught:
        run(tmp_path, fake, concurrency=1)
    assert "HTTP 403" in str(caught.value)
    assert KEY not in str(caught.value) and "***" in str(caught.value)
    assert fake.count(picked[0].chosen.strip()) == 1      # not retried


def test_the_budget_stops_the_build_and_a_rerun_resumes_without_duplicates(tmp_path, fake):
    with pytest.raises(BudgetExhausted, match="budget used up: 5 requests"):
        run(tmp_path, fake, max_requests=5)
    assert fake.count() == 5
    assert len(cache_lines(tmp_path)) == 5               # every answered request was stored
    assert not (tmp_path / "out" / "manifest.json").exists()
    result = run(tmp_path, fake)
    assert fake.count() == 4 * N
    assert set(fake.counts().values()) == {1}            # no prompt was sent twice
    assert result.manifest["build"]["usage"]["replies_from_cache"] == 5
    assert result.manifest["build"]["usage"]["requests_sent"] == 4 * N - 5


def test_an_interrupt_loses_no_reply_and_the_rerun_sends_nothing_twice(tmp_path, fake, monkeypatch):
    original = ReplyCache.put
    stored = []

    def put_then_interrupt(self, request, reply):
        key = original(self, request, reply)
        stored.append(key)
        if len(stored) == 3:
            raise KeyboardInterrupt
        return key

    monkeypatch.setattr(ReplyCache, "put", put_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, fake, concurrency=1)
    monkeypatch.setattr(ReplyCache, "put", original)
    sent_before = fake.count()
    assert 3 <= sent_before < 4 * N
    assert len(cache_lines(tmp_path)) == sent_before       # the request in flight at the interrupt was kept too
    run(tmp_path, fake)
    assert fake.count() == 4 * N
    assert set(fake.counts().values()) == {1}


def test_damaged_cache_entries_are_reported_and_asked_for_again(tmp_path, fake, caplog):
    first = run(tmp_path, fake)
    lines = cache_lines(tmp_path)
    entries = [json.loads(line) for line in lines]
    tampered = dict(entries[0], reply=dict(entries[0]["reply"], text="TAMPERED TEXT"))     # checksum mismatch
    rekeyed = dict(entries[1], key="0" * 64)                                             # wrong key
    lines[0], lines[1], lines[2] = json.dumps(tampered), json.dumps(rekeyed), lines[2][: len(lines[2]) // 2]
    (tmp_path / "cache" / CACHE_FILE).write_text("\n".join(lines) + "\n" + lines[3][:40], encoding="utf-8")
    damaged = [e["request"]["contents"] for e in entries[:3]]

    with caplog.at_level("WARNING", logger="probes.reply_cache"):
        second = run(tmp_path, fake, overwrite=True)
    assert len(second.cache_problems) == 4
    assert any("checksum does not match" in p for p in second.cache_problems)
    assert any("key does not match" in p for p in second.cache_problems)
    assert any("not valid JSON" in p for p in second.cache_problems)
    assert "ignored" in caplog.text
    counts = fake.counts()
    assert [counts[c] for c in damaged] == [2, 2, 2]                # re-requested
    assert fake.count() == 4 * N + 3                                # nothing else (the cut-off last line duplicates line 4)
    assert all("TAMPERED" not in r for c in DERIVED_CATEGORIES for r in second.probe_set.responses[c])
    assert second.probe_set.content_hash() != first.probe_set.content_hash()  # fresh replies for the damaged ones
    # the new lines were appended on a fresh line after the cut-off one: the cache now loads with only the old damage
    assert len(ReplyCache(tmp_path / "cache").problems) == 4


def test_concurrency_is_bounded(tmp_path, fake, picked):
    for pair in picked:
        fake.script(pair.chosen.strip(), Sleep(0.15))
        fake.script(pair.rejected.strip(), Sleep(0.15))
    run(tmp_path, fake, concurrency=3)
    assert fake.max_in_flight == 3


def test_cache_keys_follow_template_input_model_and_sampling(tmp_path):
    cache = ReplyCache(tmp_path)
    request = ProbeRequest("paraphrase_chosen", 0, source=" Water it weekly.")

    def key(attempt=0, **options):
        templates = options.pop("templates", PromptTemplates())
        writer = GeminiReplies(KEY, GeminiOptions(**options), templates, cache)
        return request_key(writer.cache_request(request, attempt))

    base = key()
    assert key() == base
    assert len({base, key(model="gemini-2.5-pro"), key(temperature=0.5), key(max_output_tokens=64), key(attempt=1),
                key(templates=PromptTemplates(paraphrase="Say again: {text}"))}) == 6
    entry = GeminiReplies(KEY, GeminiOptions(), PromptTemplates(), cache).cache_request(request, 0)
    assert KEY not in json.dumps(entry)


def test_the_key_comes_from_the_environment_and_is_redacted():
    assert api_key_from_env({"GOOGLE_API_KEY": "b"}) == ("b", "GOOGLE_API_KEY")
    assert api_key_from_env({"GEMINI_API_KEY": "a", "GOOGLE_API_KEY": "b"}) == ("a", "GEMINI_API_KEY")
    assert api_key_from_env({"GEMINI_API_KEY": "  "}) == (None, None)
    assert redact(f"bad key {KEY}!", KEY) == "bad key ***!"


def test_auto_falls_back_to_local_generators_when_gemini_is_unreachable(tmp_path, picked):
    import socket

    with socket.socket() as sock:      # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = BuildConfig(output=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), generator="auto",
                         base_url=f"http://127.0.0.1:{port}", num_prompts=N, max_retries=1, backoff_initial_s=0.01,
                         progress=False)
    result = build(config, environ={"GEMINI_API_KEY": KEY})
    assert result.manifest["build"]["generator"] == "local"
    assert "unreachable" in result.manifest["build"]["fallback"]
    assert result.manifest["generators"]["paraphrase_chosen"] == "builtin-rules"
    assert result.manifest["generators"]["nonresponse"] == "builtin-sentences"
    with pytest.raises(GeminiError, match="cannot reach http://127.0.0.1"):
        build(BuildConfig(**{**config.__dict__, "generator": "gemini"}), environ={"GEMINI_API_KEY": KEY})


def test_stopping_wakes_a_backoff_sleep(tmp_path, fake, picked):
    # a long Retry-After must not hold up a build that is already stopping (here: the budget ran out)
    source = picked[0].chosen.strip()
    fake.script(source, Status(429, retry_after="30"))
    started = time.monotonic()
    with pytest.raises(BudgetExhausted):
        run(tmp_path, fake, concurrency=2, max_requests=4)
    assert time.monotonic() - started < 5
    assert threading.active_count() < 20


def test_long_conversations_and_responses_are_cut_to_the_budget_and_the_cut_is_marked(tmp_path, fake):
    budget = 1000
    rows = []
    for i in range(8):  # long rows: many turns, long answers (50k+ characters each)
        turns = "".join(f"\n\nHuman: Earlier question {i}.{t}? {'Background detail. ' * 60}\n\nAssistant: "
                        f"{'An earlier answer. ' * 60}" for t in range(20))
        prompt = f"{turns}\n\nHuman: Last question {i}: how long do I boil an egg?\n\nAssistant:"
        rows.append({"chosen": f"{prompt} Chosen start {i}. {'Boil it for nine minutes. ' * 800}",
                     "rejected": f"{prompt} Rejected start {i}. {'I would rather not say. ' * 800}"})
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run(tmp_path, fake, dataset=str(data), split="train", max_input_chars=budget)
    assert fake.count() == 4 * N and len(result.probe_set.prompts) == N
    longest_template = max(len(t) for t in (PromptTemplates().paraphrase, PromptTemplates().variant))
    for seen in fake.seen:  # the bytes on the wire stay bounded (they were > 20,000 per request uncut)
        assert len(seen.contents) <= longest_template + budget, len(seen.contents)
        assert seen.body_bytes <= longest_template + budget + 1000, seen.body_bytes
    cut = [s.contents for s in fake.seen if "characters left out to fit the length limit" in s.contents]
    assert len(cut) == 3 * N  # paraphrase_chosen, paraphrase_rejected and variant; non-responses quote nothing
    # a conversation keeps its end (the question a variant answers), a response its start
    question = [c for c in cut if "how long do I boil an egg?" in c]
    assert len(question) == N and all("Earlier question" not in c.split("[...")[1] for c in question)
    assert sum("Chosen start" in c for c in cut) == N and sum("Rejected start" in c for c in cut) == N
    assert result.manifest["build"]["writers"]["gemini:gemini-2.5-flash"]["max_input_chars"] == budget


def test_clip_keeps_the_budget_and_says_how_much_was_left_out():
    from probes.gemini import clip

    text = "abcdefghij" * 100
    assert clip(text, 1000) == text
    start, end = clip(text, 200), clip(text, 200, keep_end=True)
    assert len(start) <= 200 and len(end) <= 200
    kept = len(start) - len(start.split(" [...")[0])
    assert start.startswith("abcdefghij") and end.endswith("abcdefghij")
    left_out = int(start.split("[... ")[1].split(" characters")[0])
    assert left_out == len(text) - len(start.split(" [...")[0]) and kept > 0
