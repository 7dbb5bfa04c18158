#!/usr/bin/env bash
# The vLLM checks on one CUDA machine, in one go, from a fresh copy of the repository:
#     bash benchmarks/gpu_check.sh
# Installs the `gpu` extra (upstream vLLM, CUDA torch) into its own venv, runs the vLLM engine tests
# (greedy/sampled log-probs vs transformers, weights through the object-store path, the broadcast
# path) and the broadcast-group tests, and writes benchmarks/results/gpu_check.json.
# UNTESTED: written on a CPU-only machine; no GPU was available to run it.
# The engine test's broadcast runs over NCCL only with 2+ GPUs (NCCL cannot put the trainer and the
# vLLM worker on one device); on one GPU it is skipped with that reason and the JSON says so.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${GPU_CHECK_VENV:-.venv-gpu}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
started=$(date +%s)

command -v nvidia-smi >/dev/null || { echo "gpu_check.sh: no nvidia-smi: run it on a CUDA machine" >&2; exit 2; }
python3.11 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e ".[test,gpu]" || { echo "gpu_check.sh: installing the gpu extra failed" >&2; exit 1; }
installed=$(date +%s)

"$VENV/bin/python" -m pytest -q -s -p no:cacheprovider \
    tests/rollout/test_vllm_engine.py tests/rollout/test_weight_broadcast.py \
    --junitxml="$RESULTS/gpu_check_junit.xml" 2>&1 | tee "$RESULTS/gpu_check_pytest.log"
status=${PIPESTATUS[0]}

"$VENV/bin/python" - "$RESULTS" "$status" "$((installed - started))" "$(( $(date +%s) - installed ))" <<'PY'
import json, re, subprocess, sys, xml.etree.ElementTree as ET
from pathlib import Path

results, status, install_s, test_s = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
tests = []
for case in ET.parse(results / "gpu_check_junit.xml").getroot().iter("testcase"):
    outcome = "passed"
    for kind in ("failure", "error", "skipped"):
        node = case.find(kind)
        if node is not None:
            outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
            reason = node.get("message", "")
            break
    else:
        reason = ""
    tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                  "seconds": float(case.get("time", 0)), "reason": reason[:300]})
log = (results / "gpu_check_pytest.log").read_text(errors="replace")
measured = [line.strip() for line in log.splitlines()
            if re.search(r"start-up:|max \||broadcast|load_weights:|dead receiver", line) and "Error" not in line]
import torch, vllm
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
report = {"pytest_exit_status": status, "install_seconds": install_s, "test_seconds": test_s, "gpu": gpu,
          "gpus": torch.cuda.device_count(), "torch": torch.__version__, "vllm": vllm.__version__,
          "tests": tests, "measured": measured}
(results / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps({k: report[k] for k in ("pytest_exit_status", "gpu", "vllm")}))
PY
exit "$status"
