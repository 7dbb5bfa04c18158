import hashlib
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from trainers.data.pairs import parse_hh_row, split_transcript
from trainers.data.builtin import builtin_corpus, builtin_pairs, synthetic_examples

REPO = Path(__file__).resolve().parents[3]


def _digest(examples) -> str:
    return hashlib.sha256(repr([tuple(vars(e).values()) for e in examples]).encode()).hexdigest()


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 3}


def test_same_seed_same_data_other_seed_differs():
    first, second = synthetic_examples(300, seed=3), synthetic_examples(300, seed=3)
    assert first == second and first is not second
    other = synthetic_examples(300, seed=4)
    assert [e.prompt for e in other] != [e.prompt for e in first]
    assert synthetic_examples(100, seed=3) == first[:100]  # a prefix does not depend on n


def test_identical_in_a_fresh_process_with_another_hash_seed():
    code = ("import hashlib; from trainers.data.builtin import synthetic_examples;"
            "print(hashlib.sha256(repr([tuple(vars(e).values()) for e in synthetic_examples(500, 7)]).encode()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _digest(synthetic_examples(500, 7))


def test_splits_are_sized_disjoint_and_distinct():
    train, test = builtin_pairs("train"), builtin_pairs("test")
    assert (len(train), len(test)) == (2700, 300)
    train_prompts, test_prompts = {p.prompt for p in train}, {p.prompt for p in test}
    assert len(train_prompts) == 2700 and len(test_prompts) == 300
    assert not train_prompts & test_prompts
    assert builtin_pairs("test") == test and builtin_pairs("test", seed=1) != test
    with pytest.raises(ValueError):
        builtin_pairs("dev")


def test_hh_format_round_trips_through_the_parser():
    examples = synthetic_examples()
    for i, e in enumerate(examples):
        assert e.prompt.startswith("\n\nHuman: ") and e.prompt.endswith("\n\nAssistant:")
        for response in (e.chosen, e.rejected, e.variant):
            assert response.startswith(" ") and response.strip() and "\n" not in response
            assert split_transcript(e.prompt + response) == (e.prompt, response)
        pair = parse_hh_row({"chosen": e.prompt + e.chosen, "rejected": e.prompt + e.rejected}, "builtin", i)
        assert (pair.prompt, pair.chosen, pair.rejected) == (e.prompt, e.chosen, e.rejected)
    multi = sum(e.prompt.count("\n\nHuman:") == 2 for e in examples) / len(examples)
    assert 0.10 < multi < 0.20
    assert {e.prompt.count("\n\nHuman:") for e in examples} == {1, 2}


def test_prompts_are_about_three_times_as_long_as_responses():
    examples = synthetic_examples()
    prompt_words = statistics.mean(len(e.prompt.split()) for e in examples)
    response_words = statistics.mean(len(r.split()) for e in examples for r in (e.chosen, e.rejected))
    assert 2.0 < prompt_words / response_words < 4.5
    assert 12 <= response_words <= 25 and 40 <= prompt_words <= 80
    # chosen and rejected are of similar length, so length alone does not give the preference away
    chosen = statistics.mean(len(e.chosen.split()) for e in examples)
    rejected = statistics.mean(len(e.rejected.split()) for e in examples)
    assert abs(chosen - rejected) < 3


def test_categories_are_distinguishable():
    examples = synthetic_examples()
    assert len({e.topic for e in examples}) >= 24
    assert all(e.variant != e.chosen for e in examples)
    helpful = {e.chosen for e in examples} | {e.variant for e in examples}
    assert not helpful & {e.rejected for e in examples}
    # chosen, variant and rejected are all on the prompt's topic (they reuse its key nouns); the
    # non-response sentences are not
    from trainers.data.builtin_templates import NONRESPONSE_SENTENCES

    overlap = {kind: statistics.mean(len(_words(getattr(e, kind)) & _words(e.prompt)) for e in examples)
               for kind in ("chosen", "variant", "rejected")}
    nonresponse = statistics.mean(len(_words(s) & _words(e.prompt)) for e in examples[:200] for s in NONRESPONSE_SENTENCES)
    assert min(overlap.values()) >= 2
    assert overlap["rejected"] > 0.5 * overlap["chosen"] and nonresponse < 0.25 * overlap["rejected"]
    # rejected answers open with the helpful frames chosen answers use (assistant style, not off-topic chatter)
    frames = (" Sure!", " Good question", " Happy to help")
    assert statistics.mean(e.rejected.startswith(frames) for e in examples) > 0.9
    assert statistics.mean(e.chosen.startswith(frames) for e in examples) > 0.5
    # the variant of a two-turn prompt is not the answer already given in the first turn
    for e in examples:
        if e.prompt.count("\n\nHuman:") == 2:
            assert e.variant not in e.prompt and e.chosen not in e.prompt


def test_corpus_covers_every_kind_of_text_deterministically():
    from trainers.data.builtin_templates import NONRESPONSE_SENTENCES
    from trainers.data.paraphrase import paraphrase

    corpus = builtin_corpus()
    assert corpus == builtin_corpus()
    texts = set(corpus)
    example = synthetic_examples()[5]
    for text in (example.prompt, example.chosen, example.rejected, example.variant,
                 paraphrase(example.chosen, 0), paraphrase(example.rejected, 0), " " + NONRESPONSE_SENTENCES[-1]):
        assert text in texts
    assert builtin_corpus(seed=1) != corpus
