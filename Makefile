# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_output

.PHONY: install demo test lint clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, pinned: the CPU build on these machines' disk (a bare `torch` pulls CUDA).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH DS_ACCELERATOR=cpu bash jobs/demo.sh $(DEMO_DIR)

# The venv's bin first: DeepSpeed's CPU accelerator JIT-builds a small op with the `ninja` on PATH,
# and Ray's workers find the venv's. Two ninja versions rewrite each other's build log, so every
# switch between an in-process engine and a Ray worker's would rebuild it (~30 s of both cores).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	PATH=$(abspath $(VENV))/bin:$$PATH DS_ACCELERATOR=cpu $(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
