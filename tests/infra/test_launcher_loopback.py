"""`ray up` for real: Ray's cluster launcher brings up cluster.yaml's head on this machine over SSH
to 127.0.0.1, a sweep is submitted as a Ray job through the dashboard's SSH-forwarded port, logs to
the head's MLflow server, and the cluster's own teardown leaves nothing behind.

The config is cluster.yaml's loopback twin (infra/cluster_twin.py): the file's setup commands and
head start commands run unchanged on the head: the Python check, the venv check, the PATH line of
~/.bashrc, a git clone of this checkout (file://) at its HEAD commit, `pip install --upgrade pip`,
`pip install -e .[deepspeed]`, `pip install boto3`, `ray stop`, `ray start --head` and the MLflow
server with its health wait. What the twin does not do: provision a machine (the head is a user of
this one), install from scratch (the user's ~/venv is prepared beforehand, as a machine image
would be, and shares the project's installed packages, so pip finds every dependency there), use
GPUs or worker nodes.

The head runs as a dedicated user (HEAD_USER) with its own home and Ray temp folder: cluster.yaml's
start commands begin with `ray stop`, which stops every Ray process its user may signal, and the
test suite's own Ray instances run as root. A root Ray instance started beside the cluster (after
`ray up`, so that the head gets Ray's default agent port) must survive the teardown's `ray stop`;
the test prints how many processes of other users that `ray stop` could not signal. sshd listens on
127.0.0.1:22 only (Ray's auth has no port option) with a key made for the test. The head's ports
(HEAD_PORTS) must be free: on one machine, another Ray instance started first takes Ray's defaults.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from infra.cluster_twin import assigned_variables

ROOT = Path(__file__).resolve().parents[2]
HEAD_USER = "probesweep-head"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
# ports the head takes: fixed in cluster.yaml's start commands, or Ray's defaults for `ray start --head`
# (another Ray instance on this machine takes its dashboard agent's 52365 too, if it starts first)
HEAD_PORTS = {"GCS": 6379, "object manager": 8076, "dashboard": 8265, "MLflow": 5000, "dashboard agent": 52365,
              "Ray client server": 10001}
SWEEP = "loopback"
BETAS = ("0.1", "0.5")

pytestmark = pytest.mark.launcher


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the loopback launcher test needs Linux"
    if os.geteuid() != 0:
        return "needs root: it creates the head's user and starts sshd on 127.0.0.1:22"
    missing = [name for name, path in (("openssh-server", SSHD), ("rsync", shutil.which("rsync")),
                                       ("openssh-client", shutil.which("ssh")), ("git", shutil.which("git")),
                                       ("curl", shutil.which("curl"))) if not path or not os.path.exists(path)]
    if missing:
        return f"{', '.join(missing)} not installed (.ci/run installs them: apt-get install -y openssh-server rsync)"
    if _listening(22):
        return "port 22 of 127.0.0.1 is taken (another sshd?); Ray's launcher has no SSH port option"
    return None


def _listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _run(argv: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{' '.join(argv[:4])} ... exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def _head_processes() -> list[psutil.Process]:
    """Live processes of the head's user (a zombie has exited: only its parent, or init, can reap it)."""
    return [proc for proc in psutil.process_iter(["username", "status"])
            if proc.info["username"] == HEAD_USER and proc.info["status"] != psutil.STATUS_ZOMBIE]


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[:160]}"
    except psutil.Error:
        return f"{proc.pid} (exited)"


def _stop_head_processes():
    """Cleanup after a failure: the head user's processes are this test's (the user is dedicated)."""
    procs = _head_processes()
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def _as_head(command: str, timeout: float = 300) -> str:
    return _run(["su", "-", HEAD_USER, "-c", command], timeout=timeout).stdout


def _prepare_head_user(venv_site_packages: Path, public_key: str):
    """The head 'machine': a fresh home with an authorized key, a Ray temp folder of its own, Ray on
    loopback, git allowed to read this root-owned checkout, and ~/venv sharing the project's packages."""
    try:
        pwd.getpwnam(HEAD_USER)
        _stop_head_processes()
        subprocess.run(["userdel", "--remove", HEAD_USER], capture_output=True, check=True)
    except KeyError:
        pass
    # password '*': none that works, but not a locked account, which sshd refuses even with a key
    _run(["useradd", "--create-home", "--shell", "/bin/bash", "--password", "*", HEAD_USER], timeout=60)
    home = Path(pwd.getpwnam(HEAD_USER).pw_dir)
    readable = subprocess.run(["su", "-", HEAD_USER, "-c", f"test -r '{ROOT / '.git' / 'HEAD'}' && "
                               f"test -r '{venv_site_packages / 'ray' / '__init__.py'}'"], capture_output=True)
    if readable.returncode != 0:  # a machine fact, not a defect of the launcher: say so and do not run
        pytest.skip(f"{HEAD_USER} cannot read this checkout or its .venv ({ROOT}): the head clones the one and "
                    "shares the other; clone the project where other users can read it to run this test")
    # the head's python3 (cluster.yaml's) must read the project's compiled packages: same minor version
    head_python = _as_head("python3 -c 'import sys; print(*sys.version_info[:2])'", timeout=60).split()
    if head_python != [str(v) for v in sys.version_info[:2]]:
        pytest.skip(f"{HEAD_USER}'s python3 is {'.'.join(head_python)}, the project's venv {sys.version_info[0]}."
                    f"{sys.version_info[1]}: its ~/venv could not share the installed packages")
    _as_head(textwrap.dedent(f"""\
        set -e
        install -d -m 700 ~/.ssh ~/tmp
        printf '%s\\n' '{public_key}' > ~/.ssh/authorized_keys && chmod 600 ~/.ssh/authorized_keys
        printf 'export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_TMPDIR="$HOME/tmp"  # one machine: Ray on loopback\\n' >> ~/.bashrc
        git config --global --add safe.directory '{ROOT / '.git'}'
        python3 -m venv ~/venv
        ~/venv/bin/python '{ROOT / 'infra' / 'cluster_twin.py'}' share-venv '{venv_site_packages}'
        """))
    return home


def _start_sshd(folder: Path) -> subprocess.Popen:
    host_key = folder / "ssh_host_ed25519_key"
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], timeout=30)
    config = folder / "sshd_config"
    config.write_text(textwrap.dedent(f"""\
        ListenAddress 127.0.0.1
        Port 22
        HostKey {host_key}
        PidFile {folder / 'sshd.pid'}
        AllowUsers {HEAD_USER}
        PermitRootLogin no
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        UsePAM no
        AllowTcpForwarding local
        X11Forwarding no
        """))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    log = (folder / "sshd.log").open("w")
    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    _wait_for(lambda: _listening(22) or sshd.poll() is not None, 30, "sshd on 127.0.0.1:22")
    assert sshd.poll() is None, f"sshd exited: {(folder / 'sshd.log').read_text()}"
    return sshd


def _side_ray_instance() -> subprocess.Popen:
    """A root Ray instance like the test suite's own: it must outlive the cluster's `ray stop`."""
    script = textwrap.dedent("""\
        import sys, ray
        ray.init(address="local", num_cpus=1, include_dashboard=False)
        print(ray.get_runtime_context().gcs_address, flush=True)
        for _ in sys.stdin:
            print(ray.get(ray.remote(lambda: "alive").remote(), timeout=60), flush=True)
        """)
    side = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert side.stdout.readline().strip(), "the side Ray instance did not start"
    return side


def _forward(key: Path, local_port: int, remote_port: int) -> subprocess.Popen:
    """`ssh -L`, as the README's MLflow step does (`ray attach -p` cannot pick another local port,
    and the head's own port is taken on this machine)."""
    tunnel = subprocess.Popen(["ssh", "-N", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o",
                               "UserKnownHostsFile=/dev/null", "-o", "ExitOnForwardFailure=yes", "-L",
                               f"{local_port}:127.0.0.1:{remote_port}", f"{HEAD_USER}@127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    _wait_for(lambda: _listening(local_port) or tunnel.poll() is not None, 30, f"ssh -L {local_port}")
    assert tunnel.poll() is None, tunnel.stderr.read().decode()
    return tunnel


def _sweep_runs(tracking_uri: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(SWEEP)
    assert experiment is not None, f"no experiment {SWEEP!r} on the head's MLflow server"
    parents = client.search_runs([experiment.experiment_id], f"attributes.run_name = 'sweep:{SWEEP}'")
    assert len(parents) == 1
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    return client, parents[0], [c for c in children if c.data.tags.get("stage") == "sweep"]


@pytest.fixture
def launcher_env():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    taken = [f"{name} ({port})" for name, port in HEAD_PORTS.items() if _listening(port)]
    assert not taken, f"cluster.yaml's head ports are taken on 127.0.0.1: {', '.join(taken)}"
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    return env


def test_ray_up_brings_up_cluster_yaml_on_loopback_and_runs_a_sweep(tmp_path, launcher_env):
    started = time.monotonic()
    env, bin_dir = launcher_env, Path(sys.executable).parent
    ray = str(bin_dir / "ray")
    key = tmp_path / "id_ed25519"
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "probesweep loopback test", "-f", str(key)], timeout=30)
    site_packages = Path(next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)))
    home = _prepare_head_user(site_packages, (tmp_path / "id_ed25519.pub").read_text().strip())
    twin = tmp_path / "cluster.loopback.yaml"
    start_commit = _run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], timeout=30).stdout.strip()
    _run([sys.executable, str(ROOT / "infra" / "cluster_twin.py"), "--ssh-user", HEAD_USER, "--ssh-key", str(key),
          "--ref", start_commit, "--out", str(twin)], timeout=60)
    sshd = _start_sshd(tmp_path)
    side, tunnels, timings = None, [], {}
    try:
        t0 = time.monotonic()
        _run([ray, "up", "-y", "--no-config-cache", str(twin)], timeout=900, env=env)
        timings["ray up"] = time.monotonic() - t0
        # started after `ray up`, so that the head's agent has its port: the teardown's `ray stop` must spare it
        side = _side_ray_instance()

        # the address, since on one machine `ray status` alone picks the newest of every Ray instance it sees
        status = _run([ray, "exec", str(twin), f"ray status --address 127.0.0.1:{HEAD_PORTS['GCS']}"],
                      timeout=120, env=env).stdout
        assert re.search(r"(Active|Idle):\s+1 local\.cluster\.node", status) and " CPU" in status, status[-3000:]
        # the head runs this checkout's HEAD, installed from the clone
        head_commit = _run([ray, "exec", str(twin), "git -C ~/probesweep rev-parse HEAD"], timeout=120, env=env).stdout
        variables = {n: v for c in yaml.safe_load(twin.read_text())["setup_commands"] for n, v in assigned_variables(c).items()}
        assert variables["PROBESWEEP_REPO"] == ROOT.as_uri() and variables["PROBESWEEP_REF"] == start_commit
        assert start_commit in head_commit, head_commit[-300:]
        where = _run([ray, "exec", str(twin), "python -c 'import sweeps; print(sweeps.__file__)'"], timeout=120, env=env).stdout
        assert f"{home}/probesweep/sweeps/__init__.py" in where, where[-2000:]

        # the head's servers listen on loopback only (cluster.yaml's security default)
        head_pids = {p.pid for p in _head_processes()}
        listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in head_pids}
        assert listening and all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip, _ in listening), sorted(listening)
        assert {("127.0.0.1", HEAD_PORTS["MLflow"]), ("127.0.0.1", HEAD_PORTS["dashboard"])} <= listening, sorted(listening)

        # the README's workflow: the dashboard and MLflow through SSH port forwarding
        dashboard_port, mlflow_port = _free_port(), _free_port()
        dashboard = subprocess.Popen([ray, "dashboard", "--port", str(dashboard_port), str(twin)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        tunnels.append(dashboard)
        _wait_for(lambda: _listening(dashboard_port), 60, "`ray dashboard` forwarding")
        tunnels.append(_forward(key, mlflow_port, HEAD_PORTS["MLflow"]))
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        with urllib.request.urlopen(mlflow_url + "/health", timeout=10) as response:
            assert response.status == 200

        t0 = time.monotonic()
        sweep = ["python", "sweeps/dpo_beta.py", "--address", "auto", "--tracking-uri",
                 f"http://127.0.0.1:{HEAD_PORTS['MLflow']}", "--name", SWEEP, "--experiment-name", SWEEP,
                 "--storage-path", f"{home}/runs", "--betas", *BETAS, "--sft-steps", "0", "--max-steps", "2",
                 "--eval-every", "2", "--checkpoint-every", "2", "--report-every", "1", "--num-workers", "1",
                 "--cpus-per-worker", "0.5", "--max-concurrent-trials", "2", "--num-probe-prompts", "4",
                 "--max-train-pairs", "64", "--greedy-max-tokens", "4", "--micro-batch-size", "4"]
        # Ray answers "No available agent to submit job, please try again later" until the head's
        # dashboard agent has registered (a minute or more on a busy machine): what a user would do, retry
        submit = [ray, "job", "submit", "--address", f"http://127.0.0.1:{dashboard_port}", "--working-dir", str(ROOT),
                  "--", *sweep]
        for _ in range(30):
            job = subprocess.run(submit, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
            if "No available agent to submit job" not in job.stderr + job.stdout:
                break
            timings["agent waits"] = timings.get("agent waits", 0) + 1
            time.sleep(10)
        timings["job"] = time.monotonic() - t0
        assert job.returncode == 0 and "succeeded" in job.stdout, f"{job.stdout[-6000:]}\n{job.stderr[-3000:]}"

        # the runs, read back over HTTP through the forwarded port
        client, parent, children = _sweep_runs(mlflow_url)
        assert parent.info.status == "FINISHED"
        assert sorted(c.data.params.get("beta") for c in children) == sorted(BETAS)
        for child in children:
            assert child.info.status == "FINISHED", (child.info.run_name, child.info.status)
            steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
            assert steps == [1, 2], (child.info.run_name, steps)
    finally:
        for tunnel in tunnels:  # `ray dashboard` leads its own process group, with its ssh
            if tunnel.poll() is None:
                os.killpg(tunnel.pid, 15)
                tunnel.wait(timeout=30)
        # the cluster's own teardown: Ray and the MLflow server (cluster.yaml's restart recipe), then `ray down`
        t0 = time.monotonic()
        stop = subprocess.run([ray, "exec", str(twin), "ray stop"], capture_output=True, text=True, timeout=180, env=env)
        kill_mlflow = subprocess.run([ray, "exec", str(twin), "kill -- -$(cat ~/mlflow/server.pid)"],
                                     capture_output=True, text=True, timeout=120, env=env)
        down = subprocess.run([ray, "down", "-y", str(twin)], capture_output=True, text=True, timeout=300, env=env)
        timings["teardown"] = time.monotonic() - t0
        sshd.terminate()
        sshd.wait(timeout=30)
        # the launcher's SSH master connection lingers 10 s (ControlPersist) after its last command
        try:
            _wait_for(lambda: not _head_processes(), 60, "the head's processes to end")
        except AssertionError:
            pass
        left = [_describe(p) for p in _head_processes()]
        _stop_head_processes()
        side_answer = None
        if side is not None:
            side.stdin.write("ping\n")
            side.stdin.flush()
            side_answer = side.stdout.readline().strip()
            side.stdin.close()
            side.wait(timeout=60)
        print(f"loopback launcher timings (s): { {k: round(v) for k, v in timings.items()} }, total "
              f"{time.monotonic() - started:.0f}; left after teardown: {left}; the head's `ray stop` could not "
              f"signal {stop.stdout.count('Could not terminate')} processes of other users")
    assert stop.returncode == 0 and kill_mlflow.returncode == 0 and down.returncode == 0, (
        stop.stdout[-2000:], kill_mlflow.stderr[-2000:], down.stdout[-2000:])
    assert not left, f"processes of the cluster left after its teardown: {left}"
    assert not any(_listening(port) for port in HEAD_PORTS.values())
    assert side_answer == "alive", "the root Ray instance beside the cluster did not survive its `ray stop`"
