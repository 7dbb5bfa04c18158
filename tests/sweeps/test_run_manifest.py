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
