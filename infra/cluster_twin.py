"""The loopback twin of cluster.yaml: Ray's cluster launcher runs the file's own setup commands,
head start commands (Ray and the MLflow server) and file mounts on this machine, over SSH to
127.0.0.1, so a quoting error or a server that does not come up shows here, not after paying for
cloud machines.

The twin is made from cluster.yaml, never written by hand: only the provider (Ray's on-premise
`local` provider), auth and the cluster's name are replaced, the node types removed (that provider
makes its own), and the values a
CPU machine needs (the repository to clone, the ref, the extras, where MLflow keeps artifacts) are
the shell variables cluster.yaml's commands assign (`NAME=value;`). A variable that cluster.yaml
no longer assigns is an error, so the twin cannot drift from the file silently.

    python infra/cluster_twin.py --ssh-user probesweep-head --ssh-key ~/.ssh/probesweep-head \\
        --out cluster.loopback.yaml

`share-venv` (run as the head's user, with the venv's own python) lets a fresh venv use the
packages of an installed one, so the twin's `pip install -e .[extras]` finds every dependency
there instead of downloading and unpacking them again (see `share_site_packages`).
"""
from __future__ import annotations

import argparse
import copy
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TWIN_VARIABLES = ("PROBESWEEP_REPO", "PROBESWEEP_REF", "PROBESWEEP_EXTRAS", "MLFLOW_ARTIFACTS")
COMMAND_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                 "head_start_ray_commands", "worker_start_ray_commands")
# a value goes into a shell command unquoted (so that $HOME expands): plain characters only
SAFE_VALUE = re.compile(r"[A-Za-z0-9_@%+=:,./~${}-]+")
SHARED_PTH = "probesweep-shared-packages.pth"


@dataclass(frozen=True)
class LoopbackTarget:
    """Where and how the twin's head runs: a user of this machine reached over SSH on 127.0.0.1.

    A dedicated user keeps the head apart: cluster.yaml's start commands begin with `ray stop`,
    which stops every Ray process its user may signal, and its setup edits the user's ~/.bashrc."""

    ssh_user: str
    ssh_private_key: str
    repo: str                                  # a URL git clones, e.g. file:///path/to/checkout
    ref: str                                   # a branch, tag or commit of it
    extras: str = "deepspeed"                  # no `gpu` extra: vLLM's wheels are CUDA-only
    mlflow_artifacts: str = "$HOME/mlflow/artifacts"
    head_ip: str = "127.0.0.1"

    def variables(self) -> dict[str, str]:
        return {"PROBESWEEP_REPO": self.repo, "PROBESWEEP_REF": self.ref,
                "PROBESWEEP_EXTRAS": self.extras, "MLFLOW_ARTIFACTS": self.mlflow_artifacts}


def assigned_variables(command: str) -> dict[str, str]:
    """`NAME=value` assignments (optionally exported) that end with `;` in a shell command."""
    return dict(re.findall(r"(?:^|[;\s])(?:export\s+)?([A-Z][A-Z0-9_]*)=([^\s;]*);", command))


def set_variable(command: str, name: str, value: str) -> tuple[str, int]:
    """The command with `name=...;` assigned `value` instead, and how many assignments changed."""
    if not SAFE_VALUE.fullmatch(value):
        raise ValueError(f"{name}: {value!r} has characters a shell would interpret; use letters, digits and _@%+=:,./~$-")
    pattern = re.compile(rf"((?:^|[;\s])(?:export\s+)?{name}=)[^\s;]*;")
    return pattern.subn(lambda match: f"{match.group(1)}{value};", command)


def loopback_twin(config: dict, target: LoopbackTarget) -> dict:
    """cluster.yaml's config with provider, auth and node types replaced for `target`, and the
    twin variables set; raises ValueError if cluster.yaml does not assign one of them."""
    twin = copy.deepcopy(config)
    counts = dict.fromkeys(TWIN_VARIABLES, 0)
    for key in COMMAND_LISTS:
        commands = []
        for command in twin.get(key) or []:
            for name, value in target.variables().items():
                command, changed = set_variable(command, name, value)
                counts[name] += changed
            commands.append(command)
        if key in twin:
            twin[key] = commands
    missing = [name for name, count in counts.items() if count == 0]
    if missing:
        raise ValueError(f"cluster.yaml: no command assigns {', '.join(missing)} (NAME=value;), "
                         "which the loopback twin sets; keep the variables' names")
    twin["cluster_name"] = f"{config['cluster_name']}-loopback"
    twin["max_workers"] = 0
    twin["provider"] = {"type": "local", "head_ip": target.head_ip, "worker_ips": []}
    twin["auth"] = {"ssh_user": target.ssh_user, "ssh_private_key": target.ssh_private_key}
    # the on-premise provider refuses node types: it makes one head type of its own (the machine's CPUs)
    for key in ("available_node_types", "head_node_type"):
        twin.pop(key, None)
    return twin


def share_site_packages(source_site_packages: Path) -> list[str]:
    """Make the running venv see another venv's packages, and give it their console scripts.

    A `.pth` line appends the other site-packages to sys.path (after the venv's own, so what pip
    installs here wins, and without running that folder's own .pth files, so an editable install
    there stays invisible). pip then counts those packages as installed, but creates no scripts
    for them: `ray` and `mlflow` are written here, for this venv's python. Returns the scripts."""
    import sysconfig
    from importlib.metadata import entry_points

    source = Path(source_site_packages).resolve()
    if not (source / "ray").is_dir():
        raise SystemExit(f"share-venv: {source} holds no `ray` package; give the site-packages folder of an installed venv")
    own = Path(sysconfig.get_paths()["purelib"])
    (own / SHARED_PTH).write_text(f"{source}\n")
    sys.path.append(str(source))
    bin_dir, written = Path(sys.prefix) / "bin", []
    for entry in entry_points(group="console_scripts"):
        script = bin_dir / entry.name
        if script.exists() or not entry.attr or Path(entry.dist.locate_file("")).resolve() != source:
            continue
        script.write_text(f"#!{bin_dir / 'python'}\nimport sys\nfrom {entry.module} import {entry.attr.split('.')[0]}\n"
                          f"sys.exit({entry.attr}())\n")
        script.chmod(0o755)
        written.append(entry.name)
    return sorted(written)


def git_head(checkout: Path) -> str:
    return subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    twin = sub.add_parser("twin", help="write the loopback twin of cluster.yaml (the default command)")
    root = Path(__file__).resolve().parents[1]
    twin.add_argument("--cluster-yaml", type=Path, default=root / "cluster.yaml")
    twin.add_argument("--out", type=Path, required=True, help="where to write the twin")
    twin.add_argument("--ssh-user", required=True, help="the head's user on this machine (a dedicated one)")
    twin.add_argument("--ssh-key", required=True, help="private key whose public half that user authorizes")
    twin.add_argument("--repo", help="what the head clones (default: file:// of this checkout)")
    twin.add_argument("--ref", help="the ref it checks out (default: this checkout's HEAD commit)")
    twin.add_argument("--extras", default=LoopbackTarget.extras)
    share = sub.add_parser("share-venv", help="let the running venv use another venv's packages")
    share.add_argument("site_packages", type=Path)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("twin", "share-venv", "-h", "--help"):
        argv.insert(0, "twin")
    args = build_parser().parse_args(argv)
    if args.command == "share-venv":
        print("console scripts written:", " ".join(share_site_packages(args.site_packages)) or "none")
        return
    import yaml

    if not args.cluster_yaml.is_file():
        raise SystemExit(f"--cluster-yaml: {args.cluster_yaml} does not exist")
    checkout = args.cluster_yaml.resolve().parent
    target = LoopbackTarget(ssh_user=args.ssh_user, ssh_private_key=str(Path(args.ssh_key).expanduser().resolve()),
                            repo=args.repo or checkout.as_uri(), ref=args.ref or git_head(checkout),
                            extras=args.extras)
    try:
        twin = loopback_twin(yaml.safe_load(args.cluster_yaml.read_text()), target)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    args.out.write_text(f"# Generated by infra/cluster_twin.py from {args.cluster_yaml.name}: edit that file, not this one.\n"
                        + yaml.safe_dump(twin, sort_keys=False, width=1000))
    print(f"wrote {args.out}: head {target.ssh_user}@{target.head_ip}, {target.repo} at {target.ref}")


if __name__ == "__main__":
    main()
