import dataclasses
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from probes.builtin_generators import RuleBasedGenerator
from trainers.data.builtin_templates import NONRESPONSE_SENTENCES
from trainers.data.paraphrase import paraphrase
from probes.probe_set import (DYNAMIC_CATEGORIES, STATIC_CATEGORIES, ProbeSet, ProbeSetError, build_probe_set,
                              derangement, load_or_build_probe_set)
from trainers.data.schema import PreferencePair
from trainers.data.builtin import builtin_pairs, synthetic_examples

REPO = Path(__file__).resolve().parents[2]


class MarkingGenerator:
    """Makes the origin of every derived response visible, and counts calls (for the cache test)."""

    name = "marking"

    def __init__(self):
        self.calls = 0

    def paraphrases(self, texts, seed):
        self.calls += 1
        return [f"P({t})" for t in texts]

    def variants(self, prompts, chosen, seed):
        return [f"V({c})" for c in chosen]

    def nonresponses(self, n, seed):
        return [f" N{i}" for i in range(n)]


@pytest.fixture(scope="module")
def pairs():
    return builtin_pairs("test")


@pytest.fixture(scope="module")
def probe_set(pairs):
    return build_probe_set(pairs, RuleBasedGenerator(), n_prompts=12, seed=0, source="builtin:test")


def _toy_pairs(n):
    return [PreferencePair(f"\n\nHuman: q{i}\n\nAssistant:", f" good {i}", f" bad {i}", "toy.jsonl", i) for i in range(n)]


def test_derangement_never_fixes_a_point():
    for n in range(2, 41):
        for seed in range(25):
            p = derangement(n, random.Random(seed))
            assert sorted(p) == list(range(n)) and all(p[i] != i for i in range(n))
    assert derangement(30, random.Random(1)) == derangement(30, random.Random(1))
    assert derangement(2, random.Random(0)) == [1, 0]
    for n in (0, 1):
        with pytest.raises(ValueError):
            derangement(n, random.Random(0))


def test_derangement_reaches_many_permutations():
    seen = {tuple(derangement(4, random.Random(seed))) for seed in range(300)}
    assert len(seen) == 9  # every derangement of 4 elements (D4 = 9) occurs


def test_every_static_category_built_from_the_right_text(pairs):
    generator = MarkingGenerator()
    ps = build_probe_set(pairs, generator, n_prompts=10, seed=3, source="builtin:test")
    assert ps.categories == STATIC_CATEGORIES and not set(DYNAMIC_CATEGORIES) & set(ps.categories)
    by_prompt = {p.prompt: p for p in pairs}
    picked = [by_prompt[prompt] for prompt in ps.prompts]
    r = ps.responses
    assert list(r["chosen"]) == [p.chosen for p in picked] and list(r["rejected"]) == [p.rejected for p in picked]
    assert list(r["paraphrase_chosen"]) == [f"P({p.chosen})" for p in picked]
    assert list(r["paraphrase_rejected"]) == [f"P({p.rejected})" for p in picked]  # not from the chosen text
    assert list(r["variant"]) == [f"V({p.chosen})" for p in picked]
    assert list(r["nonresponse"]) == [f" N{i}" for i in range(10)]
    assert ps.generators["paraphrase_rejected"] == "marking" and ps.generators["random"] == "derangement"
    assert ps.generators["chosen"] == "data"


def test_random_is_another_prompts_chosen(probe_set):
    chosen, other = probe_set.responses["chosen"], probe_set.responses["random"]
    assert sorted(other) == sorted(chosen)
    assert all(other[i] != chosen[i] for i in range(len(chosen)))


def test_rule_based_categories(probe_set, pairs):
    r = probe_set.responses
    variants = {e.prompt: e.variant for e in synthetic_examples()}
    for i, prompt in enumerate(probe_set.prompts):
        assert r["variant"][i] == variants[prompt] != r["chosen"][i]
        assert r["paraphrase_rejected"][i] == paraphrase(r["rejected"][i], 0) != r["rejected"][i]
        assert r["paraphrase_chosen"][i] == paraphrase(r["chosen"][i], 0) != r["chosen"][i]
        assert r["nonresponse"][i].startswith(" ") and r["nonresponse"][i][1:] in NONRESPONSE_SENTENCES
    assert len(set(r["nonresponse"])) == len(probe_set.prompts)


def test_variant_falls_back_to_another_paraphrase_outside_the_builtin_data():
    answers = [" Water the plants every day, and move them to a bright window.", " Sure! Keep it simple and start early."]
    prompts = ["\n\nHuman: unknown?\n\nAssistant:"] * 2
    out = RuleBasedGenerator().variants(prompts, answers, seed=2)
    for answer, variant in zip(answers, out):
        assert variant not in (answer, paraphrase(answer, 2))  # distinct from paraphrase_chosen
        assert variant == RuleBasedGenerator().variants(prompts[:1], [answer], seed=2)[0]


def test_prompt_selection_follows_the_seed(pairs):
    generator = RuleBasedGenerator()
    first = build_probe_set(pairs, generator, 8, seed=1, source="s")
    assert build_probe_set(pairs, generator, 8, seed=1, source="s") == first
    assert build_probe_set(pairs, generator, 8, seed=2, source="s").prompts != first.prompts
    assert build_probe_set(pairs, generator, 16, seed=1, source="s").prompts[:8] == first.prompts  # first n of one shuffle
    assert len(build_probe_set(_toy_pairs(5), MarkingGenerator(), 50, seed=0, source="toy").prompts) == 5
    with pytest.raises(ValueError):
        build_probe_set(_toy_pairs(1), MarkingGenerator(), 4, seed=0, source="toy")


def test_content_hash_is_stable_and_sensitive(probe_set):
    digest = probe_set.content_hash()
    assert re.fullmatch(r"[0-9a-f]{16}", digest)
    code = ("from probes.probe_set import build_probe_set; from probes.builtin_generators import RuleBasedGenerator;"
            "from trainers.data.pairs import load_preference_data;"
            "print(build_probe_set(load_preference_data('builtin', 'test').pairs, RuleBasedGenerator(), 12, 0,"
            " 'builtin:test').content_hash())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "99", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == digest
    # provenance is not content: the same probes from another source hash the same
    assert dataclasses.replace(probe_set, source="elsewhere", generators={}).content_hash() == digest
    changed = dict(probe_set.responses)
    changed["variant"] = changed["variant"][:-1] + (changed["variant"][-1] + " ",)
    assert dataclasses.replace(probe_set, responses=changed).content_hash() != digest
    prompts = probe_set.prompts[:-1] + (probe_set.prompts[-1] + "x",)
    assert dataclasses.replace(probe_set, prompts=prompts).content_hash() != digest


def test_save_load_round_trip(probe_set, tmp_path):
    directory = probe_set.save(tmp_path / "probes")
    assert directory == tmp_path / "probes"
    rows = [json.loads(line) for line in (directory / "probes.jsonl").read_text().splitlines()]
    assert len(rows) == 12 * len(STATIC_CATEGORIES)
    assert set(rows[0]) == {"prompt_id", "category", "prompt", "response"}
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["content_hash"] == probe_set.content_hash() and manifest["source"] == "builtin:test"
    assert manifest["generators"]["variant"] == "builtin-rules" and manifest["counts"]["prompts"] == 12
    assert "version" in manifest
    loaded = ProbeSet.load(str(directory))
    assert loaded == probe_set and loaded.content_hash() == probe_set.content_hash()


def _saved_lines(probe_set, tmp_path):
    directory = probe_set.save(tmp_path / "p")
    return directory, (directory / "probes.jsonl").read_text().splitlines()


def _write(directory, lines):
    (directory / "probes.jsonl").write_text("\n".join(lines) + "\n")


def test_load_detects_tampering(probe_set, tmp_path):
    directory, lines = _saved_lines(probe_set, tmp_path)
    row = json.loads(lines[5])
    row["response"] += " (edited)"
    lines[5] = json.dumps(row)
    _write(directory, lines)
    with pytest.raises(ProbeSetError, match=r"probes.jsonl: content hash [0-9a-f]{16} does not match .*manifest.json"):
        ProbeSet.load(directory)


@pytest.mark.parametrize("line, expected", [
    ("{not json", r"probes.jsonl, line 4: not valid JSON"),
    ('{"prompt_id": 0, "category": "chosen", "prompt": "p"}', r"probes.jsonl, line 4, field 'response'"),
    ('{"prompt_id": "0", "category": "chosen", "prompt": "p", "response": "r"}', r"probes.jsonl, line 4, field 'prompt_id'"),
    ('{"prompt_id": 0, "category": "greedy", "prompt": "p", "response": "r"}', r"probes.jsonl, line 4, field 'category'"),
])
def test_load_names_file_line_and_field_of_a_malformed_row(probe_set, tmp_path, line, expected):
    directory, lines = _saved_lines(probe_set, tmp_path)
    lines[3] = line
    _write(directory, lines)
    with pytest.raises(ProbeSetError, match=expected):
        ProbeSet.load(directory)


def test_load_detects_missing_rows_and_files(probe_set, tmp_path):
    directory, lines = _saved_lines(probe_set, tmp_path)
    _write(directory, lines[:-1])
    with pytest.raises(ProbeSetError, match=r"1 rows missing, first: prompt 11, 'nonresponse'"):
        ProbeSet.load(directory)
    (directory / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ProbeSet.load(directory)


def test_constructor_rejects_incomplete_sets(probe_set):
    responses = dict(probe_set.responses)
    del responses["random"]
    with pytest.raises(ValueError, match="random"):
        dataclasses.replace(probe_set, responses=responses)
    with pytest.raises(ValueError, match="greedy"):
        dataclasses.replace(probe_set, responses={**probe_set.responses, "greedy": probe_set.responses["chosen"]})
    with pytest.raises(ValueError, match="11 responses for 12 prompts"):
        dataclasses.replace(probe_set, responses={**probe_set.responses, "chosen": probe_set.responses["chosen"][:-1]})


def test_shards_cover_every_prompt_once(probe_set):
    for world_size in (1, 2, 3, 5, 12, 16):
        shards = [probe_set.shard(rank, world_size) for rank in range(world_size)]
        assert sorted(i for shard in shards for i in shard) == list(range(12))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        probe_set.shard(2, 2)


def test_load_or_build_reuses_the_cache(pairs, tmp_path):
    generator = MarkingGenerator()
    first = load_or_build_probe_set(tmp_path, pairs, generator, 6, seed=0, source="builtin:test")
    again = load_or_build_probe_set(tmp_path, pairs, generator, 6, seed=0, source="builtin:test")
    assert again == first and generator.calls == 2  # two paraphrase calls for the one build
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 1
    other_seed = load_or_build_probe_set(tmp_path, pairs, generator, 6, seed=1, source="builtin:test")
    assert other_seed.prompts != first.prompts and generator.calls == 4
    edited = [dataclasses.replace(p, chosen=p.chosen + "!") for p in pairs]
    rebuilt = load_or_build_probe_set(tmp_path, edited, generator, 6, seed=0, source="builtin:test")
    assert rebuilt.responses["chosen"] == tuple(c + "!" for c in first.responses["chosen"]) and generator.calls == 6


def test_paraphrase_keeps_meaning_markers_and_is_deterministic():
    texts = {x for e in synthetic_examples() for x in (e.chosen, e.rejected, e.variant)}
    for text in texts:
        out = paraphrase(text, 0)
        assert out != text and out.startswith(" ") and not out.startswith("  ")
        assert out == paraphrase(text, 0)
    assert sum(paraphrase(t, 0) != paraphrase(t, 1) for t in texts) > len(texts) // 4
    assert paraphrase(" Do not worry about it.", 0) in {" Don't worry about it.", " Put simply, do not worry about it."}
    steps = " Weigh the flour, mix it in gently, and bake the bread until golden."
    assert any(paraphrase(steps, s).startswith(" First, weigh the flour. Then") for s in range(10))
    condition = " Call a plumber if the drain stays blocked."
    assert any(paraphrase(condition, s) == " If the drain stays blocked, call a plumber." for s in range(10))


def test_nonresponses_do_not_repeat_until_exhausted():
    generator = RuleBasedGenerator()
    many = generator.nonresponses(len(NONRESPONSE_SENTENCES), seed=4)
    assert sorted(s[1:] for s in many) == sorted(NONRESPONSE_SENTENCES)
    assert generator.nonresponses(5, 4) == many[:5] and generator.nonresponses(5, 5) != many[:5]
    assert len(generator.nonresponses(150, 0)) == 150 and len(NONRESPONSE_SENTENCES) >= 60


def _other_set(probe_set):
    return dataclasses.replace(probe_set, prompts=probe_set.prompts[:-1] + (probe_set.prompts[-1] + " again",))


@pytest.mark.parametrize("crash_at", ["manifest write", "folder swap"])
def test_a_crash_while_overwriting_keeps_the_old_set(probe_set, tmp_path, monkeypatch, crash_at):
    """Under --overwrite the old set stays loadable whatever point of the save a crash hits (before: new
    probes.jsonl under the old manifest, so neither set loaded)."""
    import os

    from infra import storage

    directory = probe_set.save(tmp_path / "probes")
    newer = _other_set(probe_set)
    assert newer.content_hash() != probe_set.content_hash()
    if crash_at == "manifest write":
        real, calls = storage.write_text, []

        def write_text(path, text):
            calls.append(path)
            if Path(path).name == "manifest.json":
                raise KeyboardInterrupt("killed before the manifest")
            real(path, text)

        monkeypatch.setattr(storage, "write_text", write_text)
    else:
        real, calls = os.rename, []

        def write_text(src, dst):  # the second rename puts the new folder in place
            calls.append(src)
            if len(calls) == 2:
                raise KeyboardInterrupt("killed between the renames")
            real(src, dst)

        monkeypatch.setattr(os, "rename", write_text)
    with pytest.raises(KeyboardInterrupt):
        newer.save(directory)
    monkeypatch.undo()
    assert calls
    assert ProbeSet.load(directory) == probe_set
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probes"]   # no staging or set-aside folder left
    assert newer.save(directory) == directory and ProbeSet.load(directory) == newer


def test_a_probe_set_beside_other_files_is_not_swapped_away(probe_set, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    probe_set.save(tmp_path)                                           # no set there yet: written in place
    assert ProbeSet.load(tmp_path) == probe_set and (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ProbeSetError, match=r"holds a probe set and other files \(notes.txt\)"):
        _other_set(probe_set).save(tmp_path)
    assert ProbeSet.load(tmp_path) == probe_set
