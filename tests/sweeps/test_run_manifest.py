"""A trial's manifest from the resolved config: both the flat and the sectioned rollout settings."""
from infra.manifest import content_hash
from sweeps.run_manifest import trial_manifest


def test_dpo_trial_on_cpu_decodes_in_process():
    manifest = trial_manifest({"loss": "dpo", "use_gpu": False, "seed": 3, "greedy_max_tokens": 48, "dataset": "builtin",
                               "train_split": "train", "rollout": {"engine": "auto"}}, "p123")
    assert manifest["probe_set_hash"] == "p123" and manifest["sampling"]["seed"] == 3
    assert manifest["devices"] == {"training": "cpu", "scoring": "cpu", "rollout": "cpu (in-process hf generate)"}
    assert manifest["data_hash"].startswith("builtin:train")
    assert set(manifest["versions"]) >= {"torch", "transformers", "ray", "mlflow", "vllm", "deepspeed"}


def test_ppo_trial_with_gpu_actors_flat_or_sectioned():
    sectioned = trial_manifest({"loss": "ppo", "use_gpu": True, "rollout": {"engine": "vllm", "gpus_per_actor": 1.0}},
                               None, data_hash="abc")
    flat = trial_manifest({"loss": "ppo", "use_gpu": True, "rollout_engine": "vllm", "rollout_gpus_per_actor": 1.0}, None)
    assert sectioned["devices"]["rollout"] == flat["devices"]["rollout"] == "cuda (vllm engine)"
    assert sectioned["data_hash"] == "abc" and sectioned["probe_set_hash"] == "unknown"


def test_content_hash_is_order_and_boundary_sensitive():
    assert content_hash(["ab", "c"]) != content_hash(["a", "bc"]) != content_hash(["c", "ab"])
    assert content_hash(["ab", "c"]) == content_hash(iter(["ab", "c"])) and len(content_hash([])) == 16


def _train(**values):
    from trainers.config import TrainConfig

    return TrainConfig(**values)


def test_data_file_hash_is_the_sha256_of_its_bytes(tmp_path):
    import hashlib

    from sweeps.run_manifest import training_data_sha256

    row = '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: hello", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: go"}\n'
    one, same, other = tmp_path / "one.jsonl", tmp_path / "same.jsonl", tmp_path / "other.jsonl"
    one.write_text(row * 3)
    same.write_text(row * 3)
    other.write_text(row * 2 + row.replace("hello", "hello!"))
    hashes = {p.name: training_data_sha256(_train(dataset=str(p))) for p in (one, same, other)}
    assert hashes["one.jsonl"][0] == hashlib.sha256(one.read_bytes()).hexdigest()
    assert hashes["one.jsonl"][0] == hashes["same.jsonl"][0] != hashes["other.jsonl"][0]
    assert hashes["one.jsonl"][1] == "bytes of the file one.jsonl"  # the name, not this machine's path


def test_builtin_data_hash_is_of_the_rows_as_loaded():
    import hashlib
    import json

    from sweeps.run_manifest import training_data_sha256
    from trainers.data.builtin import builtin_pairs

    first, source = training_data_sha256(_train(dataset="builtin", max_train_pairs=40))
    assert training_data_sha256(_train(dataset="builtin", max_train_pairs=40))[0] == first
    assert training_data_sha256(_train(dataset="builtin", max_train_pairs=41))[0] != first
    lines = "".join(json.dumps({"chosen": p.chosen, "prompt": p.prompt, "rejected": p.rejected}, separators=(",", ":"),
                               ensure_ascii=False) + "\n" for p in builtin_pairs("train")[:40])
    assert first == hashlib.sha256(lines.encode()).hexdigest() and source.startswith("40 rows of builtin [train]")


def test_manifest_records_the_data_hash_and_what_it_covers():
    manifest = trial_manifest({"loss": "dpo"}, "p1", data_hash="ab" * 32, data_source="bytes of the file d.jsonl")
    assert (manifest["data_hash"], manifest["data_source"]) == ("ab" * 32, "bytes of the file d.jsonl")
