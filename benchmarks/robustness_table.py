"""The robustness table: bad inputs tried and faults injected, what each gives, whether anything was lost,
and the named test that shows it. The rows are kept here; this script checks that every named test exists
(collected with `pytest --collect-only`), then writes benchmarks/results/robustness.json and prints the
README's markdown table. A row whose test is missing fails the script: no row without a test.

    python benchmarks/robustness_table.py            # check, write the JSON, print the table
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "robustness.json"

# outcome kinds
ERROR = "clear error naming the place"
RECOVERED = "recovered"
RESUMED = "resumed"
SKIPPABLE = "clear error naming the place; skippable (--skip-bad-rows)"

D = "tests/trainers/data/test_data.py"
CLI = "tests/sweeps/test_cli.py"
BAD_ROW = f"{D}::test_each_kind_of_bad_row_names_file_row_and_field"
BAD_FLAG = f"{CLI}::test_bad_values_are_refused_at_parse_time_naming_the_flag"
URI = "tests/sweeps/test_uri_credentials.py::test_a_uri_with_credentials_is_refused_without_echoing_the_secret"
GEMINI = "tests/probes/test_gemini.py"
PT = "tests/trainers/runs/test_policy_trainer.py"

# (group, what was tried, what it gives, outcome kind, what was lost, test)
BAD_INPUTS = [
    # data rows (.jsonl/.json/.parquet)
    ("data row", "field 'rejected' missing", "file, 1-based line, field 'rejected': missing", SKIPPABLE, "nothing", BAD_ROW),
    ("data row", "'chosen' is a number", "file, line, field: expected a string, got int", SKIPPABLE, "nothing", BAD_ROW),
    ("data row", "transcript without an Assistant turn", "file, line, field: no Assistant turn", SKIPPABLE, "nothing", BAD_ROW),
    ("data row", "rejected transcript's prompt differs from chosen's", "file, line, field 'rejected'", SKIPPABLE, "nothing", BAD_ROW),
    ("data row", "whitespace-only response", "file, line, field: empty response", SKIPPABLE, "nothing", BAD_ROW),
    ("data row", "nothing before the Assistant turn", "file, line, field: empty prompt", SKIPPABLE, "nothing", BAD_ROW),
    ("data row", "explicit prompt null", "file, line, field 'prompt': expected a string", SKIPPABLE, "nothing", BAD_ROW),
    ("data row", "row is a list, not an object", "file, line, field '<row>'", SKIPPABLE, "nothing", BAD_ROW),
    ("data row", "a line that is not JSON", "file, line, field '<json>': not valid JSON", SKIPPABLE, "nothing",
     f"{D}::test_unparsable_json_line_is_a_data_error"),
    ("data row", "bytes that are not UTF-8 (latin-1) in .jsonl and .json", "file, line, field, byte and column", SKIPPABLE,
     "nothing", f"{D}::test_bytes_that_are_not_utf8_are_a_skippable_data_error_naming_line_and_field"),
    ("data row", "non-UTF-8 byte inside a broken JSON line", "file, line, '<json>', byte and column", SKIPPABLE, "nothing",
     f"{D}::test_bytes_that_are_not_utf8_in_a_broken_line_still_name_the_line"),
    ("data row", 'JSON "\\ud800" escape (lone surrogate)', "file, line, field: lone surrogate, at load time", SKIPPABLE,
     "nothing", f"{D}::test_a_lone_surrogate_escape_is_a_data_error_at_load_time"),
    ("data row", "U+2028 / U+0085 inside a JSON string", "read as one row (not split)", RECOVERED, "nothing",
     f"{D}::test_a_line_separator_inside_a_json_string_does_not_split_the_row"),
    ("data row", "null field in a parquet file", "file, row (0-based), field", SKIPPABLE, "nothing",
     f"{D}::test_parquet_null_field_is_a_bad_row"),
    ("data row", "row longer than the limits with --truncation error", "file, row, field: longer than N tokens", ERROR,
     "nothing", "tests/trainers/data/test_collate.py::test_truncation_policy"),
    ("data row", "a bad row in a sweep's data", "one line 'error: hh.jsonl, line 7, field ...', exit 1, nothing trained",
     ERROR, "nothing", "tests/sweeps/test_user_errors.py::test_a_bad_data_row_stops_the_sweep_in_one_line_without_a_traceback"),
    # files
    ("file", "broken JSON list file", "file, line and column of the syntax error (never skipped)", ERROR, "nothing",
     f"{D}::test_broken_json_list_names_the_file"),
    ("file", "missing data file / .csv data file", "data file not found: path / unsupported data file", ERROR, "nothing",
     f"{D}::test_missing_and_unsupported_files"),
    ("file", "checkpoint holding a pickle that would run code", "refused by weights_only loading; the code never runs", ERROR,
     "nothing", f"{PT}::test_a_planted_pickle_is_refused_and_runs_nothing"),
    ("file", "corrupt last checkpoint", "falls back to the previous checkpoint with a warning naming the file", RECOVERED,
     "the steps after the previous checkpoint (retrained)", f"{PT}::test_a_corrupt_last_checkpoint_falls_back_to_the_previous"),
    ("file", "no readable checkpoint", "fails once naming every file", ERROR, "nothing",
     f"{PT}::test_no_readable_checkpoint_fails_once_naming_every_file"),
    ("file", "cut-short / damaged reference log-prob file", "recomputed with a warning naming the file", RECOVERED, "nothing",
     f"{PT}::test_a_damaged_reference_file_is_recomputed_with_a_warning"),
    ("file", "damaged reference file given to a worker", "error naming the file", ERROR, "nothing",
     f"{PT}::test_a_worker_names_a_damaged_reference_file"),
    ("file", "tampered probe set", "content hash mismatch named on load", ERROR, "nothing",
     "tests/probes/test_probe_set.py::test_load_detects_tampering"),
    ("file", "malformed probe-set row", "file, line and field named", ERROR, "nothing",
     "tests/probes/test_probe_set.py::test_load_names_file_line_and_field_of_a_malformed_row"),
    ("file", "probe set with missing rows or files", "named on load", ERROR, "nothing",
     "tests/probes/test_probe_set.py::test_load_detects_missing_rows_and_files"),
    ("file", "damaged Gemini reply-cache entries", "reported and asked for again", RECOVERED, "nothing",
     f"{GEMINI}::test_damaged_cache_entries_are_reported_and_asked_for_again"),
    ("file", "edited data file at the same path", "new SFT warm-up cache key (no stale warm-up reused)", RECOVERED, "nothing",
     "tests/sweeps/test_cache_keys.py::test_the_warmup_key_changes_when_the_data_file_changes_in_place"),
    ("file", "changed local model folder", "new SFT warm-up cache key", RECOVERED, "nothing",
     "tests/sweeps/test_cache_keys.py::test_the_warmup_key_changes_when_a_local_model_folder_changes"),
    ("file", "probe set replaced at the same path after the sweep started", "the worker stops, naming the folder and "
     "both hashes", ERROR, "nothing", "tests/trainers/runs/test_probe_set_check.py::test_a_probe_set_replaced_after_the_run_recorded_it_is_refused"),
    ("file", "probe set replaced, met by real Ray Train workers that may retry (max_failures 2)",
     "refused once, the ranks agreeing: one report, no retry by Train or Tune; the trial fails its run naming folder and hashes",
     ERROR, "nothing", "tests/trainers/runs/test_refusals.py::test_a_replaced_probe_set_is_refused_once_not_retried"),
    ("file", "a sweep's --dataset file missing (path/that/does/not/exist.jsonl)",
     "one line 'error: --dataset ...: no such file', exit 1, before the tokenizer, MLflow or Ray", ERROR, "nothing",
     "tests/sweeps/test_user_errors.py::test_a_missing_data_file_stops_the_sweep_in_one_line_before_anything_starts"),
    ("file", "a sweep's --dataset file unreadable (a folder named .jsonl; no read permission)",
     "one line naming --dataset and the system's reason, before anything starts", ERROR, "nothing",
     "tests/sweeps/test_user_errors.py::test_a_missing_or_unreadable_data_file_is_refused_before_start_naming_the_flag"),
    ("file", "corrupt latest Ray Train checkpoint, earlier ones kept (--checkpoints-to-keep >= 2)",
     "resumes from the newest readable kept checkpoint, a warning naming the skipped file", RECOVERED,
     "the steps after that checkpoint (retrained)",
     "tests/trainers/runs/test_checkpoint_fallback.py::test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_kept_one"),
    ("file", "every kept Ray Train checkpoint unreadable", "one CheckpointError naming every file; the run is refused once",
     ERROR, "nothing", "tests/trainers/runs/test_checkpoint_fallback.py::test_no_readable_kept_checkpoint_fails_once_naming_every_file"),
    # config values (flags and YAML)
    *[("config value", flag, f"one line naming {name}, exit 2, before anything starts", ERROR, "nothing", BAD_FLAG)
      for flag, name in [("--lr nan", "--lr"), ("--lr inf", "--lr"), ("--lrs 1e-3 nan", "--lrs"), ("--beta inf", "--beta"),
                         ("--beta 0", "--beta"), ("--max-failures -1", "--max-failures"),
                         ("--warmup-steps 0", "--warmup-steps"), ("--sft-steps -1", "--sft-steps"),
                         ("--label-smoothing 0.5", "--label-smoothing"), ("--label-smoothing 0.1 --loss ipo", "--label-smoothing"),
                         ("--rollout-actors 0", "--rollout-actors"), ("--rollout-timeout-s nan", "--rollout-timeout-s"),
                         ("--ppo-gamma 1.5", "--ppo-gamma"), ("--cpus-per-worker 0", "--cpus-per-worker"),
                         ("--worker-shares tiny-pythia-1m=inf", "--worker-shares"), ("--num-cpus 0", "--num-cpus"),
                         ("--sft-recipes chosen rejected", "--sft-recipes"), ("--name ../x", "--name"),
                         ("--name a/b", "--name"), ("--resume --overwrite", "both flags")]],
    ("config value", "--betas -1 on dpo_beta.py", "one line, exit 2, no warm-up trained", ERROR, "nothing",
     f"{CLI}::test_a_bad_beta_stops_before_the_warmup_with_one_line"),
    ("config value", "lr .nan in a --config YAML file", "the file and the flag named", ERROR, "nothing",
     f"{CLI}::test_a_bad_value_in_the_yaml_file_names_the_file_and_the_flag"),
    ("config value", "a flag the entry point fixes (sft.py --loss dpo, ...)", "one line naming the flag and why", ERROR,
     "nothing", f"{CLI}::test_a_flag_the_entry_point_fixes_is_refused_in_one_line"),
    ("config value", "--checkpoints-to-keep 0 / --storage-cache-gb 0", "one line naming the flag", ERROR, "nothing",
     "tests/infra/test_storage_cache.py::test_checkpoints_to_keep_and_the_cache_limit_are_flags_checked_at_parse_time"),
    ("config value", "--holdout-fraction outside (0, 1)", "refused naming the flag", ERROR, "nothing",
     "tests/trainers/data/test_holdout.py::test_holdout_fraction_outside_the_open_unit_interval_is_refused"),
    ("config value", "--max-prompt-tokens + --max-response-tokens past the model's context", "one line naming both flags and "
     "the limit, before training", ERROR, "nothing",
     "tests/sweeps/test_user_errors.py::test_limits_past_the_context_length_stop_the_sweep_before_training"),
    ("config value", "an existing --name without --resume/--overwrite", "refused; the earlier sweep stays resumable", ERROR,
     "nothing", "tests/sweeps/test_driver.py::test_an_existing_sweep_name_is_refused_without_resume_or_overwrite"),
    ("config value", "workers/actors a local Ray can never place", "refused naming the flags and the capacity", ERROR,
     "nothing", "tests/sweeps/test_driver.py::test_resources_a_local_ray_can_never_provide_are_refused_before_start"),
    ("config value", "--resume without a state file", "names the missing file", ERROR, "nothing",
     "tests/sweeps/test_driver.py::test_resume_without_a_state_file_names_the_missing_file"),
    ("config value", "--resume against a store without the parent run", "says so", ERROR, "nothing",
     "tests/sweeps/test_driver.py::test_resume_against_a_store_without_the_parent_run_says_so"),
    ("config value", "--trials-on-head false with a loopback --tracking-uri (127.0.0.1, localhost, ::1)",
     "one line naming both flags (other nodes cannot reach the head's loopback), exit 2", ERROR, "nothing",
     f"{CLI}::test_trials_off_the_head_with_a_loopback_tracking_server_are_refused"),
    # URIs
    *[("URI", what, "one line naming the flag and where credentials belong; the secret nowhere in the output", ERROR,
       "nothing", URI)
      for what in ["--storage-path s3://KEY:SECRET@bucket/...", "--storage-path with a secret containing '/'",
                   "--storage-path ...?secret_key=...", "--tracking-uri http://user:password@host",
                   "--tracking-uri postgresql://user:password@db/...", "--init-checkpoint gs://user:secret@bucket/...",
                   "--reward s3://...?session_token=..."]],
    ("URI", "storage_path with credentials in a --config YAML", "refused, secret not echoed", ERROR, "nothing",
     "tests/sweeps/test_uri_credentials.py::test_a_yaml_file_with_a_secret_in_a_uri_is_refused_without_echoing_it"),
    ("URI", "dpo_beta.py / reward_model.py with secret URIs", "exit 2, one line, secret in neither stdout nor stderr", ERROR,
     "nothing", "tests/sweeps/test_uri_credentials.py::test_the_entry_points_refuse_a_secret_in_a_uri_before_anything_starts"),
    # Gemini replies
    ("Gemini reply", "transient failures (5xx / network)", "retried, then succeed", RECOVERED, "nothing",
     f"{GEMINI}::test_transient_failures_are_retried_and_then_succeed"),
    ("Gemini reply", "429 with Retry-After", "waited as told", RECOVERED, "nothing", f"{GEMINI}::test_retry_after_is_honoured"),
    ("Gemini reply", "replies that fail validation", "asked again with another seed", RECOVERED, "nothing",
     f"{GEMINI}::test_rejected_replies_are_asked_for_again_with_another_seed"),
    ("Gemini reply", "a probe that keeps failing", "its prompt dropped and recorded", RECOVERED, "one prompt (recorded)",
     f"{GEMINI}::test_a_probe_that_keeps_failing_drops_its_prompt"),
    ("Gemini reply", "too many failures", "the probe set is refused", ERROR, "nothing",
     f"{GEMINI}::test_too_many_failures_refuse_the_probe_set"),
    ("Gemini reply", "a request that stays unavailable", "a failure, not a hang", ERROR, "nothing",
     f"{GEMINI}::test_a_request_that_stays_unavailable_is_a_failure"),
    ("Gemini reply", "key refused (401/403)", "build stops without showing the key", ERROR, "nothing",
     f"{GEMINI}::test_a_refused_key_stops_the_build_without_showing_the_key"),
    ("Gemini reply", "budget exhausted", "build stops; a rerun resumes without duplicates", RESUMED, "nothing",
     f"{GEMINI}::test_the_budget_stops_the_build_and_a_rerun_resumes_without_duplicates"),
    ("Gemini request", "data rows of 50,000+ characters (long conversations and responses)",
     "each text cut to --max-input-chars (a conversation keeps its end), the cut marked in the request; request bytes bounded",
     RECOVERED, "the cut part of those texts (Gemini does not see it)",
     f"{GEMINI}::test_long_conversations_and_responses_are_cut_to_the_budget_and_the_cut_is_marked"),
]

FAULTS = [
    ("killed driver", "whole process group killed mid-trial, then --resume", "same parent and child runs reopened",
     RESUMED, "nothing", "tests/sweeps/test_sweep_resume.py::test_resume_reopens_the_same_parent_and_child_runs"),
    ("killed driver", "the interrupted trial after --resume", "continues from its checkpoint; the finished trial is not rerun",
     RESUMED, "nothing", "tests/sweeps/test_sweep_resume.py::test_interrupted_trial_continued_from_its_checkpoint"),
    ("killed driver", "curves after the resume", "exactly one point per step", RESUMED, "nothing",
     "tests/sweeps/test_sweep_resume.py::test_every_curve_has_one_point_per_step"),
    ("killed node (with its training workers)", "a worker node of a real multi-node local cluster killed",
     "the sweep survives; the lost trial resumes from its checkpoint", RESUMED, "the steps since the last checkpoint (retrained)",
     "tests/sweeps/test_cluster_sweep.py::test_sweep_survives_the_loss_of_a_worker_node"),
    ("killed node (with its training workers)", "curves of the trial that lost its node", "complete, one point per step",
     RESUMED, "nothing", "tests/sweeps/test_cluster_sweep.py::test_the_lost_trial_resumed_from_its_checkpoint_with_complete_curves"),
    ("killed actor", "a rollout actor lost with its node", "restarts; the next weight sync updates it", RECOVERED, "nothing",
     "tests/rollout/test_rollout.py::test_an_actor_lost_with_its_node_restarts_and_the_next_sync_updates_it"),
    ("killed actor", "an actor restarted with its start weights before probe decodes (--probe-decodes actors)",
     "the evaluation fails naming both weight versions, no decodes of stale weights scored", ERROR, "nothing",
     "tests/trainers/runs/test_probe_decode_versions.py::test_decodes_from_a_restarted_actor_are_refused"),
    ("killed actor", "a slow or dead actor", "an error after --rollout-timeout-s, not a hang", ERROR, "nothing",
     "tests/rollout/test_rollout.py::test_a_slow_or_dead_actor_is_an_error_not_a_hang"),
    ("MLflow server down", "tracking server unreachable at start", "fails before training, naming the URI", ERROR, "nothing",
     "tests/sweeps/test_cluster_sweep.py::test_server_unreachable_fails_before_training"),
    ("MLflow SQLite contention", "store locked past MLflow's 20 s busy timeout", "the write waits (backoff) and succeeds",
     RECOVERED, "nothing", "tests/infra/test_tracking_contention.py::test_a_write_waits_out_a_lock_held_past_sqlites_busy_timeout"),
    ("crash mid-write", "process dies between two log_batch calls of a >1,000-point batch",
     "whole steps only; the replay fills the rest, no gap, no duplicate", RESUMED, "nothing",
     "tests/infra/test_tracking_contention.py::test_a_batch_cut_short_between_calls_leaves_whole_steps_for_the_replay"),
    ("disk full", "a 1 MiB tmpfs filled by a state-file write", "ENOSPC; the old file whole, no temporary left", ERROR,
     "nothing", "tests/infra/test_disk_full.py::test_a_write_that_fills_the_disk_keeps_the_old_file_whole"),
    ("crash mid-write", "a writer that fails part-way", "the old file stays, no temporary", RECOVERED, "nothing",
     "tests/infra/test_atomic_files.py::test_a_failed_write_leaves_the_old_file_and_no_temporary"),
    ("crash mid-write", "crash between the two renames of a folder swap", "the old folder is restored", RECOVERED, "nothing",
     "tests/infra/test_atomic_files.py::test_a_crash_between_the_renames_of_replace_dir_loses_nothing"),
    ("crash mid-write", "crash while overwriting a probe set", "the old set is kept and restored on load", RECOVERED,
     "nothing", "tests/probes/test_probe_set.py::test_a_crash_while_overwriting_keeps_the_old_set"),
    ("crash mid-write", "a failed build of a built-in pretrained model", "leaves nothing; the next call builds", RECOVERED,
     "nothing", "tests/trainers/model/test_pretrained.py::test_a_failed_build_leaves_nothing_and_the_next_call_builds"),
    ("interrupt", "Ctrl-C during a Gemini probe build", "every reply kept; the rerun sends nothing twice", RESUMED, "nothing",
     f"{GEMINI}::test_an_interrupt_loses_no_reply_and_the_rerun_sends_nothing_twice"),
    ("crashing trial", "--max-failures N (the FailureConfigs a sweep builds for Ray Train and Tune)",
     "N retries at one level (Ray Train with trials on the head, Tune with --trials-on-head false), the other 0: at most "
     "N + 1 runs, not (N + 1)²; not run with a crashing trial", ERROR, "nothing",
     "tests/sweeps/test_retries.py::test_trials_on_the_head_are_retried_by_ray_train_only"),
    ("diverged trial", "lr 1e30: non-finite loss", "the trial fails once, named in one line; the sweep exits 1", ERROR,
     "nothing", "tests/sweeps/test_sweep_failures.py::test_a_diverged_trial_fails_loudly_once_and_the_sweep_exits_non_zero"),
    ("disk use", "node-local cache of remote files past --storage-cache-gb", "least recently used copies removed; "
     "a removed copy is fetched again when asked for", RECOVERED, "nothing (copies of remote files only)",
     "tests/infra/test_storage_cache.py::test_the_node_cache_keeps_within_its_limit_dropping_the_least_recently_used"),
    ("concurrent processes", "several processes of a node ask for one remote folder", "downloaded once, every reader gets it whole",
     RECOVERED, "nothing", "tests/infra/test_storage.py::test_concurrent_local_copy_downloads_once_per_node"),
]


def collected_tests(files: set[str]) -> set[str]:
    """file::function of every test pytest collects in `files` (parameters stripped)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *sorted(files)],
                          cwd=ROOT, capture_output=True, text=True)
    names = {line.split("[")[0] for line in done.stdout.splitlines() if "::" in line}
    if not names:
        raise SystemExit(f"pytest collected nothing:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return names


def rows_of(table, kind: str) -> list[dict]:
    return [{"kind": kind, "group": g, "tried": t, "gives": w, "outcome": o, "lost": l, "test": test}
            for g, t, w, o, l, test in table]


def markdown(rows: list[dict]) -> str:
    lines = ["| # | kind | tried | gives | lost | test |", "|---|---|---|---|---|---|"]
    for number, row in enumerate(rows, 1):
        cells = [str(number), f"{row['kind']}: {row['group']}", row["tried"], row["gives"], row["lost"],
                 f"`{Path(row['test'].split('::')[0]).name}::{row['test'].split('::')[1]}`"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def main() -> int:
    rows = rows_of(BAD_INPUTS, "bad input") + rows_of(FAULTS, "fault")
    existing = collected_tests({row["test"].split("::")[0] for row in rows})
    missing = sorted({row["test"] for row in rows} - existing)
    if missing:
        print("rows without a collected test:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 1
    counts = {"bad_inputs": len(BAD_INPUTS), "faults": len(FAULTS),
              "distinct_tests": len({row["test"] for row in rows}),
              "by_outcome": {o: sum(r["outcome"] == o for r in rows) for o in sorted({r["outcome"] for r in rows})},
              "by_group": {g: sum(r["group"] == g for r in rows) for g in sorted({r["group"] for r in rows})}}
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({"counts": counts, "rows": rows}, indent=2) + "\n")
    print(markdown(rows))
    print(f"\n{counts['bad_inputs']} bad inputs, {counts['faults']} faults, {counts['distinct_tests']} distinct tests; "
          f"written to {RESULT.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
