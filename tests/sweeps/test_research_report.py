"""The research report rebuilt from the store (--report-only) keeps what the runs recorded."""
import json

from sweeps import research_check


def test_report_only_keeps_recorded_timings_and_names_the_weights(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    earlier = {"models": {"tiny-pythia-1m": {"timings": {"sft_s": 12.5}, "provenance": {"sft": "an earlier run"}},
                          "other": {"model": "other", "lora_rank": 0, "checks": [], "runs": {"sft": [], "dpo": [], "ppo": []}}}}
    (out / "research_check.json").write_text(json.dumps(earlier))

    assert research_check.main(["--report-only", "--storage-path", str(tmp_path / "runs"), "--out", str(out)]) == 0

    report = json.loads((out / "research_check.json").read_text())
    model = report["models"]["tiny-pythia-1m"]
    assert model["timings"] == {"sft_s": 12.5}
    assert model["provenance"] == {"sft": "an earlier run"}
    assert "other" in report["models"]
    # an empty store: every phase reads "not measured", never a pass
    assert {c["passed"] for c in model["checks"]} == {None}
    table = (out / "research_check.md").read_text()
    assert "Weights: random-init built-in GPT-NeoX model." in table
    assert (out / "research_check.png").stat().st_size > 0
