"""Per-token Δ log p views on hand-made evaluations where the moved tokens are known; the npz round trip;
the command against a real MLflow SQLite store."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from probes.token_records import log_probe_records, read_token_npz, split_token_fields, write_token_npz
from probes.token_views import choose_steps, main, render_html, token_delta, token_deltas, top_movers


def record(prompt_id, category, ids, logps, texts=None):
    return {"prompt_id": prompt_id, "category": category, "logp_sum": float(sum(logps)), "num_tokens": len(ids),
            "token_ids": list(ids), "token_texts": texts or [f"w{t}" for t in ids], "token_logps": list(logps)}


# step 0 -> step 10: chosen token 2 ("w12") rises by 3 nats, rejected token 0 falls by 5, the rest stay;
# greedy keeps its first two tokens and then decodes something else
BEFORE = [record(0, "chosen", [10, 11, 12, 13], [-1.0, -2.0, -6.0, -1.5]),
          record(0, "rejected", [20, 21], [-4.0, -3.0]),
          record(0, "greedy", [30, 31, 32], [-0.5, -0.7, -0.9])]
AFTER = [record(0, "chosen", [10, 11, 12, 13], [-1.0, -2.0, -3.0, -1.5]),
         record(0, "rejected", [20, 21], [-9.0, -3.0]),
         record(0, "greedy", [30, 31, 40, 41], [-0.4, -0.6, -0.2, -0.1])]


def as_map(records, tmp_path, name):
    return read_token_npz(write_token_npz(records, tmp_path / name))


def test_npz_round_trip_keeps_every_token(tmp_path):
    scores = as_map(BEFORE, tmp_path, "a.npz")
    assert sorted(scores) == [(0, "chosen"), (0, "greedy"), (0, "rejected")]
    chosen = scores[(0, "chosen")]
    assert chosen.token_ids.tolist() == [10, 11, 12, 13] and chosen.token_texts == ["w10", "w11", "w12", "w13"]
    np.testing.assert_allclose(chosen.token_logps, [-1.0, -2.0, -6.0, -1.5])
    with np.load(tmp_path / "a.npz", allow_pickle=False) as data:  # no object arrays inside
        assert all(data[k].dtype != object for k in data.files)


def test_known_moved_tokens_come_out_on_top(tmp_path):
    deltas = token_deltas(as_map(BEFORE, tmp_path, "a.npz"), as_map(AFTER, tmp_path, "b.npz"))
    by_category = {d.category: d for d in deltas}
    np.testing.assert_allclose(by_category["chosen"].delta, [0.0, 0.0, 3.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(by_category["rejected"].delta, [-5.0, 0.0], atol=1e-6)
    greedy = by_category["greedy"]
    assert greedy.shared == 2 and greedy.diverged and greedy.token_texts == ["w30", "w31", "w40", "w41"]
    np.testing.assert_allclose(greedy.delta, [0.1, 0.1], atol=1e-6)
    movers = top_movers(deltas, 2)
    assert [(m["category"], m["token"], round(m["delta_logp"], 4)) for m in movers] == [
        ("rejected", "w20", -5.0), ("chosen", "w12", 3.0)]
    page = render_html(deltas, (0, 10), "t")
    assert "decode changed after token 2" in page and "Δ -5.000" in page and "Δ +3.000" in page
    assert page.count("class='t u'") == 2  # the two greedy tokens with no earlier counterpart


def test_a_wholly_different_decode_has_no_delta():
    from probes.token_records import TokenScores

    before = TokenScores(np.array([1, 2]), ["a", "b"], np.array([-1.0, -1.0], np.float32))
    after = TokenScores(np.array([3]), ["c"], np.array([-0.5], np.float32))
    d = token_delta(0, "greedy", before, after)
    assert d.shared == 0 and d.delta.size == 0 and d.diverged


def test_step_choice_and_its_errors():
    assert choose_steps([0, 5, 10], None) == (0, 10)
    assert choose_steps([0, 5, 10], [5, 10]) == (5, 10)
    with pytest.raises(ValueError, match=r"--steps: no per-token log-probs at step\(s\) \[7\]"):
        choose_steps([0, 5, 10], [0, 7])
    with pytest.raises(ValueError, match="two are needed"):
        choose_steps([0], None)


def test_command_on_a_real_mlflow_store(tmp_path, capsys):
    from infra.tracking import Tracker, default_tracking_uri

    uri = default_tracking_uri(tmp_path)
    tracker = Tracker(uri)
    run_id = tracker.start_run(tracker.experiment_id("views"), "trial")
    log_probe_records(tracker, run_id, BEFORE, 0)
    log_probe_records(tracker, run_id, AFTER, 10)
    # the CSV keeps only scalar columns; the tokens went to the npz
    csv = pd.read_csv(tracker.download_artifact(run_id, "logps/step_000010.csv", tmp_path / "dl"))
    assert set(csv.columns) == set(split_token_fields(AFTER)[0][0])
    out = tmp_path / "views"
    assert main(["--run-id", run_id, "--tracking-uri", uri, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "step_000000_to_000010.html", "step_000000_to_000010.png", "step_000000_to_000010_top_tokens.csv"]
    top = pd.read_csv(out / "step_000000_to_000010_top_tokens.csv")
    assert top.iloc[0][["category", "token"]].tolist() == ["rejected", "w20"]
    assert (out / "step_000000_to_000010.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(tracker.list_artifacts(run_id, "token_views")) == sorted(f"token_views/{p.name}" for p in out.iterdir())
    capsys.readouterr()
    assert main(["--run-id", run_id, "--tracking-uri", uri, "--steps", "0", "3", "--no-log", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "--steps: no per-token log-probs at step(s) [3]; the run has [0, 10]"
    assert main(["--run-id", "nope", "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err.startswith("--run-id: no run 'nope'")
