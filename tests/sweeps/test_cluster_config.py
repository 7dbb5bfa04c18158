"""cluster.yaml, checked offline: Ray's own validation of a cluster launcher config, then what this
project expects of it. No Ray is started and nothing leaves the machine.

`ray up` first merges the file with the provider's defaults.yaml (`prepare_config`), then asks AWS
for instance types (only to fill in resources we give explicitly anyway), then checks the merged
config against Ray's JSON schema and its cross-field rules (`validate_config`), and only then
bootstraps the provider (key pairs, subnets, IAM), which needs credentials. `ray_validate` runs the
two offline steps, in that order.
"""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from infra.cluster_twin import assigned_variables

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"
SWEEP_BLOCK = "# THEN A SWEEP RUNS WITH"
REQUIRED_KEYS = ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type",
                 "setup_commands", "head_start_ray_commands", "worker_start_ray_commands")


def load_cluster_yaml() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_validate(config: dict) -> dict:
    """Ray's offline checks of a cluster config (raises on a bad one); returns the merged config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def project_problems(config: dict) -> list[str]:
    """What this project needs beyond Ray's schema; an empty list when the config has it all.

    Ray's defaults fill in a missing cluster_name ("default"), max_workers or head_node_type, and
    its schema (JSON Schema draft 7) takes 1.0 as an integer: these are checked here."""
    problems = [f"{key} is not set in the file (Ray would use its default)" for key in REQUIRED_KEYS
                if key not in config]
    node_types = config.get("available_node_types") or {}
    for name, node_type in node_types.items():
        resources = node_type.get("resources")
        if not resources or "CPU" not in resources:
            problems.append(f"{name}: resources must be explicit, CPU included")
        for resource, amount in (resources or {}).items():
            if type(amount) is not int or amount < 0:
                problems.append(f"{name}: resource {resource}={amount!r} is not a non-negative integer")
        if "InstanceType" not in (node_type.get("node_config") or {}):
            problems.append(f"{name}: node_config has no InstanceType")
    head = node_types.get(config.get("head_node_type"), {})
    if (head.get("resources") or {}).get("GPU", 0) != 0:
        problems.append("the head node declares GPUs")
    gpu_workers = [name for name, node_type in node_types.items() if name != config.get("head_node_type")
                   and type((node_type.get("resources") or {}).get("GPU")) is int
                   and node_type["resources"]["GPU"] >= 1 and node_type.get("max_workers", 1) >= 1]
    if not gpu_workers:
        problems.append("no worker node type declares an integer GPU count >= 1")
    return problems


def pip_installs(commands: list[str]) -> list[list[str]]:
    """The arguments of every `pip install` in the commands, with the variables the command assigns
    (`NAME=value;`) filled in."""
    installs = []
    for command in commands:
        for name, value in assigned_variables(command).items():
            command = command.replace("$" + name, value)
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)  # ; && || as tokens of their own
        lexer.wordchars += "$:[],"
        words = list(lexer)
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":
                args = []
                for word in words[i + 2:]:
                    if word and set(word) <= set("();<>|&"):
                        break
                    args.append(word)
                installs.append(args)
    return installs


def mlflow_server_args(command: str) -> list[str] | None:
    """The arguments of the `mlflow server` the command starts (inside `sh -c '...'` or not)."""
    match = re.search(r"mlflow server (.*?)(?:'|$)", command)
    return shlex.split(match.group(1)) if match else None


def click_options(command) -> set[str]:
    return {option for param in command.params for option in (*param.opts, *param.secondary_opts)}


def comment_lines() -> list[str]:
    return [line.strip() for line in CLUSTER_YAML.read_text().splitlines() if line.lstrip().startswith("#")]


def sweep_argv() -> list[str]:
    """The sweep flags the file's header tells the user to pass, with placeholders filled in."""
    text = CLUSTER_YAML.read_text()
    assert SWEEP_BLOCK in text, f"cluster.yaml has no {SWEEP_BLOCK!r} section"
    block = text[text.index(SWEEP_BLOCK):].split("\n\n")[0]
    lines = [line[1:].strip() for line in block.splitlines() if re.match(r"#\s+--", line)]
    argv = shlex.split(" ".join(lines).replace("<head-ip>", "10.0.0.10").replace("<bucket>", "my-bucket"))
    assert argv, "no flag lines under the sweep section"
    return argv


# --- Ray's validation -----------------------------------------------------------------------------

def test_ray_accepts_cluster_yaml():
    prepared = ray_validate(load_cluster_yaml())
    assert prepared["provider"]["type"] == "aws"
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["max_workers"] == 0  # filled in by Ray for the head type
    # setup_commands run on every node, before the head's own
    assert prepared["head_setup_commands"][: len(prepared["setup_commands"])] == prepared["setup_commands"]


@pytest.mark.parametrize("bad_gpu", [0.5, "one", True, -1])
def test_ray_rejects_a_resource_of_the_wrong_type(bad_gpu):
    config = load_cluster_yaml()
    config["available_node_types"]["gpu_worker"]["resources"]["GPU"] = bad_gpu
    import jsonschema

    with pytest.raises(jsonschema.ValidationError, match="integer|minimum"):
        ray_validate(config)  # rejected by Ray's schema
    assert project_problems(config), "our check must reject it too"


def test_a_float_that_is_whole_passes_ray_but_not_our_check():
    config = load_cluster_yaml()
    config["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 1.0
    ray_validate(config)  # draft-7 JSON Schema counts 1.0 as an integer
    assert any("GPU=1.0" in problem for problem in project_problems(config)), "rejected by our check, not by Ray"


@pytest.mark.parametrize("path, error", [
    (("available_node_types", "gpu_worker", "node_config"), "'node_config' is a required property"),
    (("available_node_types", "head_cpu", "resources"), "'resources' is a required property"),
])
def test_ray_rejects_a_node_type_without_a_required_field(path, error):
    import jsonschema

    config = load_cluster_yaml()
    del config[path[0]][path[1]][path[2]]
    with pytest.raises(jsonschema.ValidationError, match=re.escape(error)):
        ray_validate(config)  # rejected by Ray's schema
    assert project_problems(config), "our check must reject it too"


def test_ray_rejects_a_config_without_provider():
    config = load_cluster_yaml()
    del config["provider"]
    with pytest.raises(KeyError, match="provider"):
        ray_validate(config)  # rejected by Ray's prepare_config: it looks up the provider's defaults
    assert any("provider" in problem for problem in project_problems(config)), "our check must reject it too"


def test_ray_rejects_a_config_without_head_node_type():
    config = load_cluster_yaml()
    del config["head_node_type"]
    # Ray fills in its default head type ("ray.head.default"), which is not one of ours
    with pytest.raises(ValueError, match="head_node_type"):
        ray_validate(config)  # rejected by Ray's validate_config
    assert any("head_node_type" in problem for problem in project_problems(config)), "rejected by our check too"


@pytest.mark.parametrize("key", ["cluster_name", "max_workers"])
def test_a_missing_key_that_ray_defaults_is_rejected_by_our_check(key):
    config = load_cluster_yaml()
    del config[key]
    ray_validate(config)  # Ray quietly uses its defaults ("default", 2)
    assert any(key in problem for problem in project_problems(config)), "rejected by our check, not by Ray"


# --- what this project expects --------------------------------------------------------------------

def test_project_expectations_hold():
    assert project_problems(load_cluster_yaml()) == []


def test_head_has_no_gpu_and_gpu_workers_declare_integer_gpus():
    config = load_cluster_yaml()
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and type(head["resources"]["CPU"]) is int
    workers = {name: t for name, t in node_types.items() if name != config["head_node_type"]}
    assert any(type(t["resources"].get("GPU")) is int and t["resources"]["GPU"] >= 1 for t in workers.values())
    assert all(t.get("max_workers", 0) >= 1 for t in workers.values())


def test_setup_installs_the_gpu_and_deepspeed_extras():
    config = load_cluster_yaml()
    extras = set()
    for args in pip_installs(config["setup_commands"]):
        for arg in args:
            match = re.fullmatch(r"\.\[([\w,-]+)\]", arg)
            if match:
                extras |= set(match.group(1).split(","))
    assert {"gpu", "deepspeed"} <= extras, f"setup_commands install the extras {sorted(extras)}"
    # the laptop recipe (CPU torch first) is wrong on GPU nodes
    assert not any(arg.startswith("torch") for args in pip_installs(config["setup_commands"]) for arg in args)


def test_head_starts_ray_and_an_mlflow_server_with_a_backend_store():
    from mlflow.cli import server
    from ray.scripts.scripts import start

    config = load_cluster_yaml()
    commands = config["head_start_ray_commands"]
    ray_starts = [c[c.index("ray start"):] for c in commands if "ray start" in c]
    assert len(ray_starts) == 1
    ray_args = start.make_context("start", shlex.split(ray_starts[0])[2:]).params  # parsed by Ray's own CLI
    assert ray_args["head"] and ray_args["port"] == 6379 and ray_args["num_gpus"] == 0
    assert ray_args["dashboard_host"] == "127.0.0.1"  # its Jobs API runs any code: reached over SSH forwarding
    assert ray_args["autoscaling_config"].endswith("ray_bootstrap_config.yaml")

    mlflow_commands = [c for c in commands if mlflow_server_args(c)]
    assert len(mlflow_commands) == 1, "exactly one command starts `mlflow server`"
    command = mlflow_commands[0]
    mlflow_args = server.make_context("server", mlflow_server_args(command)).params  # parsed by MLflow's CLI
    assert mlflow_args["port"] == 5000 and mlflow_args["host"] == "127.0.0.1"  # no auth: loopback only
    store = mlflow_args["backend_store_uri"]
    assert re.fullmatch(r"sqlite:///(/|\$HOME/)\S+\.db", store) or store.startswith("postgresql"), store
    assert mlflow_args["artifacts_destination"] == "$MLFLOW_ARTIFACTS"
    assert re.search(r"MLFLOW_ARTIFACTS=s3://\S+/mlflow-artifacts;", command)
    # in the background, detached from the SSH session, so the start command returns
    assert "nohup" in command and re.search(r"< /dev/null &", command) and "> ~/mlflow/server.log 2>&1" in command


def test_no_command_opens_a_port_on_every_interface():
    """The dashboard and MLflow bind the head's loopback address; nothing else may listen on 0.0.0.0 or ::."""
    config = load_cluster_yaml()
    commands = [c for key in ("setup_commands", "head_setup_commands", "head_start_ray_commands",
                              "worker_start_ray_commands") for c in config.get(key) or []]
    wildcard = [c for c in commands if re.search(r"0\.0\.0\.0|\[::\]|--host[= ]::", c)]
    assert wildcard == []
    # and the sweep section's tracking URI is the head's loopback, which only SSH forwarding reaches from outside
    assert any(word == "http://127.0.0.1:5000" for word in sweep_argv())


def test_workers_join_the_head():
    from ray.scripts.scripts import start

    starts = [c[c.index("ray start"):] for c in load_cluster_yaml()["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 1
    assert start.make_context("start", shlex.split(starts[0])[2:]).params["address"] == "$RAY_HEAD_IP:6379"


def test_single_machine_settings_stay_off_the_cluster():
    # the file may say why it is absent, but no value (command, env) may set it
    values = yaml.safe_dump(load_cluster_yaml())
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in values


def test_sweep_flags_of_the_header_parse():
    from sweeps.config import parse_config

    argv = sweep_argv()
    config = parse_config(argv, "cluster.yaml")  # exits (SystemExit) on an unknown flag or a bad value
    assert config.address == "auto" and config.train.use_gpu is True
    assert config.tracking_uri == "http://127.0.0.1:5000"  # the head's MLflow server, on its loopback address
    assert config.storage_path == "s3://my-bucket/probesweep"
    assert config.train.gpus_per_worker == 1 and config.train.rollout.gpus_per_actor == 1


def test_every_flag_the_comments_mention_exists():
    """A flag in a comment is the sweep's (sweeps.config.build_parser) or one of the Ray / MLflow
    commands the file runs or names (ray start, ray up, ray job submit, mlflow server); anything
    else is a typo or a flag that was renamed."""
    from mlflow.cli import server
    from ray.scripts.scripts import cli

    from sweeps.config import build_parser

    parser, _ = build_parser()
    sweep_flags = set(parser._option_string_actions)
    ray_commands = [cli.commands["start"], cli.commands["up"], cli.commands["job"].commands["submit"]]
    other_flags = set().union(*map(click_options, ray_commands), click_options(server))
    mentioned = {flag for line in comment_lines() for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line)}
    assert mentioned, "no flags found in the comments"
    unknown = sorted(mentioned - sweep_flags - other_flags)
    assert not unknown, f"cluster.yaml mentions flags that exist nowhere: {unknown}"
    # and the sweep section uses sweep flags only
    block_flags = {word for word in sweep_argv() if word.startswith("--")}
    assert block_flags <= sweep_flags, sorted(block_flags - sweep_flags)
