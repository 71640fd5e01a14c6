# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_output

.PHONY: install demo demo-hand test test-fast lint clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, pinned: the CPU build on these machines' disk (a bare `torch` pulls CUDA). DeepSpeed compiles
# its CPU shared-memory collective on first use, into ~/.cache/torch_extensions: here, once, rather than
# inside a niced Ray worker of the first test or demo run (minutes under load).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" > /dev/null
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH DS_ACCELERATOR=cpu bash jobs/demo.sh $(DEMO_DIR)

# The paper's hand experiment on 64x64 depth maps, the same four steps (under $(DEMO_DIR)/hand).
demo-hand: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH DS_ACCELERATOR=cpu KIND=hand bash jobs/demo.sh $(DEMO_DIR)/hand

# The venv's bin first, as for `make demo` and the job-submit tests' cluster: DeepSpeed's CPU
# accelerator JIT-builds a small op with the `ninja` on PATH, and two ninja versions (the system's,
# pip's) rewrite each other's build log, so each switch between them rebuilds it (~30 s, both cores).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	PATH=$(abspath $(VENV))/bin:$$PATH DS_ACCELERATOR=cpu $(PY) -m pytest tests

# What to run while editing (a few minutes on 2 cores): everything but the tests marked `slow`, those
# that start Ray, DeepSpeed or the S3 server (tests/conftest.py checks the marker). `make test` runs all.
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	PATH=$(abspath $(VENV))/bin:$$PATH DS_ACCELERATOR=cpu $(PY) -m pytest tests -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
