# softserve developer tasks. `make test` is the CI entry point (.ci/run).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
SOFTSERVE ?= softserve
# the exact versions every install takes (pip constraints; scripts/lock.sh writes it)
LOCK ?= requirements.lock

.PHONY: torch install install-dev run test deploy-test gpu-check bench data docker lock

# torch first, on its own, in the build that fits the machine (CPU build unless nvidia-smi shows a GPU;
# scripts/install_torch.sh), so that the project install after it finds torch satisfied. Every step is a
# no-op (seconds) when already installed.
torch:
	PYTHON=$(PYTHON) TORCH_VERSION=$(TORCH_VERSION) sh scripts/install_torch.sh

# what serving needs
install: torch
	$(PIP) install -c $(LOCK) -e .

# what the tests need too: pytest, peft, openai, triton, kubernetes-validate, kubectl
install-dev: torch
	$(PIP) install -c $(LOCK) -e '.[dev]'

run: install
	$(SOFTSERVE) serve

test: install-dev
	$(PYTHON) -m pytest -q

# builds the image and runs it, the compose scale-out, and the cpu overlay on a one-node Kubernetes cluster
# (../shared/tools/k8s-here.sh); each part is skipped, with the reason, where its engine or cluster cannot run
deploy-test: install-dev
	$(PYTHON) -m pytest -q -m deploy tests/deploy

# every GPU check and benchmark in one run on a CUDA machine (~8 min on one H100): scripts/gpu_check.sh
gpu-check:
	PYTHON=$(PYTHON) bash scripts/gpu_check.sh

bench:
	$(SOFTSERVE) bench

data:
	$(PYTHON) scripts/make_example_data.py

docker:
	docker build -t softserve:cpu .

# resolve requirements.lock afresh (newest versions pyproject.toml allows) in a new virtual environment
lock:
	PYTHON=$(PYTHON) TORCH_VERSION=$(TORCH_VERSION) sh scripts/lock.sh
