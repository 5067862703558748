# softserve developer tasks. `make test` is the CI entry point (.ci/run).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
SOFTSERVE ?= softserve

.PHONY: install run test bench data docker

# torch is pinned first and on its own: on a CPU machine this pin resolves to the CPU build, and the project
# install below then finds torch satisfied. Both steps are no-ops (seconds) when already installed.
install:
	$(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -e '.[dev]'

run: install
	$(SOFTSERVE) serve

test: install
	$(PYTHON) -m pytest -q

bench:
	$(SOFTSERVE) bench

data:
	$(PYTHON) scripts/make_example_data.py

docker:
	docker build -t softserve .
