# DrPose: one-command set-up, tests, demo and benchmarks.
#
#   make demo    create/refresh .venv if needed, fine-tune the tiny world with DrPose through the
#                deepspeed launcher, evaluate base vs fine-tuned, write runs/demo/report.{json,md} + figures
#   make test    create/refresh .venv if needed, then run the test suite (what CI runs)
#   make venv    only create/refresh the environment
#   make bench   kernel benchmark (python benchmarks/run.py kernel)
#
# The environment is rebuilt only when it is missing, broken, or older than the files that
# describe it (pyproject.toml, setup.py, constraints.txt); a second `make test` installs nothing.

PYTHON        ?= python3
VENV          ?= .venv
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for torch alone, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
PYTEST_ARGS   ?=
DEMO_DIR      ?= runs/demo
DEMO_ARGS     ?=

VPY   := $(VENV)/bin/python
STAMP := $(VENV)/.drpose-installed
PIP   := $(VPY) -m pip --disable-pip-version-check
# JIT-compiled DeepSpeed ops are cached inside the checkout so they are built once.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: venv demo test bench clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt
	@if ! $(VPY) -c "import sys" >/dev/null 2>&1; then \
		echo "[make] creating virtual environment in $(VENV)"; \
		rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); \
	fi
	@# torch first and pinned: an unpinned torch would pull the newest multi-GB CUDA build.
	$(PIP) install -q "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(PIP) install -q -c constraints.txt -e ".[test]"
	@touch $@

demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	@# a free rendezvous port, so that the demo runs next to other DeepSpeed jobs on the machine
	$(VENV)/bin/deepspeed --num_gpus 1 --master_port $$($(VPY) -m drpose.training.rendezvous) \
		drpose/train.py --config configs/tiny.yaml run.output_dir=$(DEMO_DIR) $(DEMO_ARGS)
	$(VPY) -m drpose.report --run $(DEMO_DIR)
	@echo "[demo] report: $(DEMO_DIR)/report.md (figures and report.json next to it)"

test: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(VPY) benchmarks/run.py kernel

clean-venv:
	rm -rf $(VENV)
