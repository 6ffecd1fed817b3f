# deeprebirth: set-up, tests, examples. `make install` is idempotent and quick once Caffe is built and cached.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU Caffe unless DEEPREBIRTH_CUDA=1 (or =auto and a GPU is listed by nvidia-smi); switching re-runs the install.
CAFFE_FLAVOUR := $(if $(filter 1 yes on,$(DEEPREBIRTH_CUDA)),cuda,$(if $(filter auto,$(DEEPREBIRTH_CUDA)),$(shell \
	command -v nvcc >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU' && echo cuda || echo cpu),cpu))
FLAVOUR_STAMP := $(VENV)/.caffe-$(CAFFE_FLAVOUR)

.PHONY: install example test check docs lint bench clean

install: $(STAMP)

$(STAMP): setup.py setup.cfg pyproject.toml proto/caffe.proto scripts/build_caffe.sh $(FLAVOUR_STAMP)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "numpy>=2,<3" "protobuf>=3.20" six
	DEEPREBIRTH_CUDA=$(if $(filter cuda,$(CAFFE_FLAVOUR)),1,0) scripts/build_caffe.sh $(PY)
	$(PY) -m pip install --quiet -e ".[test,runtimes]"
	$(PY) -m pip install --quiet --no-deps pnnx  # ONNX -> ncnn converter binary (its Python side wants torch)
	$(PY) scripts/fetch_assets.py > /dev/null
	touch $(STAMP)

$(FLAVOUR_STAMP):
	mkdir -p $(VENV)
	rm -f $(VENV)/.caffe-*
	touch $@

# The main job end to end on bundled models: exact folds on the real open_nsfw ResNet-50, checked in real Caffe, then
# the model-zoo GoogLeNet slimmed with the default rules and timed in real Caffe.
example: install
	$(PY) examples/open_nsfw.py

# Tiers and markers: tests/conftest.py. One test file per worker (--dist loadfile): the files that share
# module-scoped fixtures and caches build them once, and the two cores stay busy with the heavy files.
JOBS ?= 2
test: install
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile

# The fast tier for the edit loop: everything not marked slow (each slow test has a cheaper sibling in it).
check: install
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile -m "not slow"

# The documentation site, warnings as errors (the option tables are generated from the CLI at build time).
docs: install
	$(PY) -m mkdocs build --strict

lint: install
	$(VENV)/bin/ruff check --line-length 120 --extend-exclude deeprebirth/caffe_pb2.py deeprebirth tests benchmarks examples scripts
	$(VENV)/bin/mypy deeprebirth

bench: install
	$(PY) benchmarks/rewrite_speed.py
	$(PY) benchmarks/slim_speed.py
	$(PY) benchmarks/big_model.py
	$(PY) -m benchmarks.fuzz --cases 10000

clean:
	rm -rf $(VENV) build dist site *.egg-info deeprebirth/caffe_pb2.py deeprebirth/caffe_pb2.pyi
