import json
import pickle

import pandas as pd
import pytest

from trainers.data.pairs import (DataError, PreferencePair, load_preference_data, parse_dataset_spec, parse_hh_row,
                           split_transcript)

PROMPT = "\n\nHuman: How do I boil an egg?\n\nAssistant:"
MULTI = "\n\nHuman: Hi, can you help me cook?\n\nAssistant: Of course.\n\nHuman: How do I boil an egg?\n\nAssistant:"


def hh(prompt=PROMPT, chosen=" Boil it for nine minutes.", rejected=" No."):
    return {"chosen": prompt + chosen, "rejected": prompt + rejected}


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def test_split_transcript_cuts_after_the_last_assistant_turn():
    assert split_transcript(PROMPT + " Nine minutes.") == (PROMPT, " Nine minutes.")
    assert split_transcript(MULTI + " Nine minutes.") == (MULTI, " Nine minutes.")
    with pytest.raises(ValueError, match="Assistant"):
        split_transcript("\n\nHuman: hello there")


def test_single_and_multi_turn_hh_rows():
    pair = parse_hh_row(hh(), "data.jsonl", 3)
    assert pair == PreferencePair(PROMPT, " Boil it for nine minutes.", " No.", source="data.jsonl", row=3)
    multi = parse_hh_row(hh(MULTI, " Put it in boiling water.", " Figure it out."), "data.jsonl", 0)
    assert multi.prompt == MULTI and multi.prompt.count("Assistant:") == 2  # earlier turns stay in the prompt
    assert multi.chosen == " Put it in boiling water." and multi.rejected == " Figure it out."


def test_explicit_rows_keep_the_given_prompt_and_responses():
    row = {"prompt": PROMPT, "chosen": " Nine minutes.", "rejected": " No.", "extra": 1}
    assert parse_hh_row(row, "x.json", 5) == PreferencePair(PROMPT, " Nine minutes.", " No.", "x.json", 5)


BAD_ROWS = [
    ({"chosen": PROMPT + " ok"}, "rejected", "missing"),
    ({"chosen": 7, "rejected": PROMPT + " no"}, "chosen", "expected a string, got int"),
    (hh(prompt="\n\nHuman: no marker here"), "chosen", "Assistant"),
    ({"chosen": PROMPT + " ok", "rejected": "\n\nHuman: How do I boil an egg? No."}, "rejected", "Assistant"),
    (hh() | {"rejected": "\n\nHuman: How do I fry an egg?\n\nAssistant: No."}, "rejected", "prompt differs"),
    (hh(chosen="   \n"), "chosen", "empty response"),
    (hh(rejected=""), "rejected", "empty response"),
    (hh(prompt="\n\nAssistant:"), "chosen", "empty prompt"),
    ({"prompt": "  ", "chosen": " a", "rejected": " b"}, "prompt", "empty prompt"),
    ({"prompt": PROMPT, "chosen": " a", "rejected": " "}, "rejected", "empty response"),
    ({"prompt": None, "chosen": " a", "rejected": " b"}, "prompt", "expected a string, got NoneType"),
    (["not", "an", "object"], "<row>", "expected an object"),
]


@pytest.mark.parametrize("bad, field, reason", BAD_ROWS)
def test_each_kind_of_bad_row_names_file_row_and_field(tmp_path, bad, field, reason):
    path = write_jsonl(tmp_path / "data.jsonl", [hh(), hh(), bad, hh()])
    with pytest.raises(DataError) as error:
        load_preference_data(path)
    assert (error.value.source, error.value.row, error.value.field, error.value.line) == ("data.jsonl", 2, field, 3)
    assert str(error.value).startswith(f"data.jsonl, line 3, field '{field}': ")  # 1-based, as an editor shows it
    assert reason in str(error.value)


def test_skip_bad_rows_collects_and_counts(tmp_path):
    rows = [hh(), {"chosen": 1, "rejected": 2}, hh(chosen=" Nine."), "{not json", hh(rejected=" "), hh()]
    loaded = load_preference_data(write_jsonl(tmp_path / "mixed.jsonl", rows), skip_bad_rows=True)
    assert [p.row for p in loaded.pairs] == [0, 2, 5]
    assert [(e.row, e.field) for e in loaded.skipped] == [(1, "chosen"), (3, "<json>"), (4, "rejected")]
    assert loaded.skipped[1].line == 4 and str(loaded.skipped[1]).startswith("mixed.jsonl, line 4, field '<json>'")


def test_unparsable_json_line_is_a_data_error(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [hh(), '{"chosen": "x",'])
    with pytest.raises(DataError, match=r"broken.jsonl, line 2, field '<json>': not valid JSON"):
        load_preference_data(path)


def test_blank_lines_are_ignored_in_jsonl(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps(hh()) + "\n\n   \n" + json.dumps(hh(chosen=" Two.")) + "\n")
    assert [p.chosen for p in load_preference_data(str(path)).pairs] == [" Boil it for nine minutes.", " Two."]


def test_jsonl_json_list_json_lines_and_parquet_give_the_same_pairs(tmp_path):
    rows = [hh(), hh(MULTI, " Put it in boiling water.", " No."), {"prompt": PROMPT, "chosen": " a", "rejected": " b"}]
    (tmp_path / "list.json").write_text(json.dumps(rows, indent=2))
    write_jsonl(tmp_path / "lines.json", rows)
    write_jsonl(tmp_path / "rows.jsonl", rows)
    pd.DataFrame(rows[:2]).to_parquet(tmp_path / "rows.parquet")
    loaded = {name: load_preference_data(str(tmp_path / name)).pairs
              for name in ("list.json", "lines.json", "rows.jsonl", "rows.parquet")}
    content = {name: [(p.prompt, p.chosen, p.rejected, p.row) for p in pairs] for name, pairs in loaded.items()}
    assert content["list.json"] == content["lines.json"] == content["rows.jsonl"]
    assert content["rows.parquet"] == content["rows.jsonl"][:2]
    assert {p.source for p in loaded["rows.parquet"]} == {"rows.parquet"}
    assert len(content["list.json"]) == 3 and content["list.json"][1][0] == MULTI


def test_parquet_null_field_is_a_bad_row(tmp_path):
    pd.DataFrame([hh(), {"chosen": PROMPT + " x", "rejected": None}]).to_parquet(tmp_path / "nulls.parquet")
    with pytest.raises(DataError, match=r"nulls.parquet, row 1 \(0-based\), field 'rejected': expected a string"):
        load_preference_data(str(tmp_path / "nulls.parquet"))


def test_broken_json_list_names_the_file(tmp_path):
    (tmp_path / "bad.json").write_text('[{"chosen": "a"},\n oops]')
    with pytest.raises(DataError) as error:
        load_preference_data(str(tmp_path / "bad.json"), skip_bad_rows=True)  # a file-level error is never skipped
    assert str(error.value).startswith("bad.json, field '<json>': not valid JSON (line 2")


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_preference_data(str(tmp_path / "nowhere.jsonl"))
    (tmp_path / "data.csv").write_text("chosen,rejected\n")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_preference_data(str(tmp_path / "data.csv"))


def test_max_rows_keeps_the_first_valid_rows_and_stops_reading(tmp_path):
    rows = [hh(chosen=" 0"), {"chosen": 3}, hh(chosen=" 2"), hh(chosen=" 3"), {"broken": True}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    loaded = load_preference_data(path, skip_bad_rows=True, max_rows=3)
    assert [p.chosen for p in loaded.pairs] == [" 0", " 2", " 3"] and len(loaded.skipped) == 1
    # the bad last row is never reached when two rows are enough
    assert [p.chosen for p in load_preference_data(write_jsonl(tmp_path / "e.jsonl", [rows[0], rows[2], rows[4]]),
                                                   max_rows=2).pairs] == [" 0", " 2"]


def test_dataset_spec_parsing():
    assert parse_dataset_spec("Anthropic/hh-rlhf") == ("Anthropic/hh-rlhf", None)
    assert parse_dataset_spec("Anthropic/hh-rlhf:helpful-base") == ("Anthropic/hh-rlhf", "helpful-base")
    assert parse_dataset_spec("org/name:") == ("org/name", None)
    with pytest.raises(ValueError):
        parse_dataset_spec(":helpful-base")


def test_local_datasets_folder_is_read_by_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = {name: datasets.Dataset.from_list([hh(chosen=f" {name} {i}") for i in range(n)])
              for name, n in (("train", 3), ("test", 2))}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "hh-local"))
    test = load_preference_data(str(tmp_path / "hh-local"), "test")
    assert [p.chosen for p in test.pairs] == [" test 0", " test 1"]
    assert test.pairs[0].source == "hh-local [test]" and test.pairs[0].prompt == PROMPT
    assert len(load_preference_data(str(tmp_path / "hh-local"), "train").pairs) == 3


def test_builtin_spec_and_its_splits():
    test = load_preference_data("builtin", "test")
    assert len(test.pairs) == 300 and test.skipped == []
    assert {p.source for p in test.pairs} == {"builtin"} and [p.row for p in test.pairs[:3]] == [0, 1, 2]
    assert len(load_preference_data("builtin", "train", max_rows=10).pairs) == 10
    with pytest.raises(ValueError, match="'validation'"):
        load_preference_data("builtin", "validation")


def test_data_error_survives_pickling():
    error = DataError("data.jsonl", 17, "rejected", "prompt differs from the chosen transcript's prompt")
    again = pickle.loads(pickle.dumps(error))
    assert (again.source, again.row, again.field, again.reason) == ("data.jsonl", 17, "rejected", error.reason)
    assert str(again) == "data.jsonl, row 17 (0-based), field 'rejected': prompt differs from the chosen transcript's prompt"
    assert isinstance(again, ValueError)
    located = pickle.loads(pickle.dumps(DataError("data.jsonl", 17, "chosen", "empty response", line=19)))
    assert located.line == 19 and str(located) == "data.jsonl, line 19, field 'chosen': empty response"


def test_blank_lines_count_in_line_numbers_but_not_in_rows(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps(hh()) + "\n\n   \n" + json.dumps(hh(chosen=" ")) + "\n")
    with pytest.raises(DataError) as error:
        load_preference_data(str(path))
    assert (error.value.row, error.value.line) == (1, 4)
    assert str(error.value) == "gaps.jsonl, line 4, field 'chosen': empty response"


def test_json_list_rows_are_located_by_their_line(tmp_path):
    rows = [hh(), hh(), hh(rejected=" ")]
    (tmp_path / "list.json").write_text(json.dumps(rows, indent=2))
    with pytest.raises(DataError) as error:
        load_preference_data(str(tmp_path / "list.json"))
    text = json.dumps(rows, indent=2).split("\n")
    starts = [i + 1 for i, line in enumerate(text) if line == "  {"]  # each element's opening line
    assert len(starts) == 3 and (error.value.row, error.value.line) == (2, starts[2]) == (2, 10)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_bytes_that_are_not_utf8_are_a_skippable_data_error_naming_line_and_field(tmp_path, suffix):
    good = [json.dumps(hh()).encode(), json.dumps(hh(chosen=" Two.")).encode()]
    bad = json.dumps(hh(chosen=" caf__")).encode().replace(b"__", b"\xe9!")  # latin-1, not UTF-8
    if suffix == ".jsonl":
        data, line = b"\n".join([good[0], bad, good[1]]) + b"\n", 2
    else:
        data, line = b"[\n" + b",\n".join([good[0], bad, good[1]]) + b"\n]\n", 3
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(data)
    with pytest.raises(DataError) as error:
        load_preference_data(str(path))
    assert (error.value.source, error.value.row, error.value.field, error.value.line) == (path.name, 1, "chosen", line)
    assert str(error.value).startswith(f"{path.name}, line {line}, field 'chosen': not UTF-8 text: byte 0xe9 at column ")
    loaded = load_preference_data(str(path), skip_bad_rows=True)
    assert [p.chosen for p in loaded.pairs] == [" Boil it for nine minutes.", " Two."] and len(loaded.skipped) == 1


def test_bytes_that_are_not_utf8_in_a_broken_line_still_name_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_bytes(json.dumps(hh()).encode() + b"\n{\"chosen\": \"\xff\n")
    with pytest.raises(DataError, match=r"broken.jsonl, line 2, field '<json>': not UTF-8 text: byte 0xff at column 13"):
        load_preference_data(str(path))


def test_a_lone_surrogate_escape_is_a_data_error_at_load_time(tmp_path):
    text = json.dumps(hh(chosen=" Fine.")) + "\n" + json.dumps(hh()).replace("Boil it", "Boil \\ud800it") + "\n"
    path = tmp_path / "surrogate.jsonl"
    path.write_text(text)
    with pytest.raises(DataError) as error:
        load_preference_data(str(path))
    assert (error.value.field, error.value.line) == ("chosen", 2)
    assert "lone surrogate \\ud800" in str(error.value)
    assert [p.chosen for p in load_preference_data(str(path), skip_bad_rows=True).pairs] == [" Fine."]
    for pair in load_preference_data(str(path), skip_bad_rows=True).pairs:
        (pair.prompt + pair.chosen + pair.rejected).encode("utf-8")  # what passes is writable text


def test_a_line_separator_inside_a_json_string_does_not_split_the_row(tmp_path):
    rows = [hh(chosen=" one\u2028two"), hh(chosen=" three\x85")]
    path = tmp_path / "separators.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    pairs = load_preference_data(str(path)).pairs
    assert [p.chosen for p in pairs] == [" one\u2028two", " three\x85"] and [p.line for p in pairs] == [1, 2]
