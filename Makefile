# metai: `make demo` runs the main job, `make test` runs the tests. Both create .venv on first use.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test lab docs clean

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned: on CPU-only machines pip takes the local CPU wheel of this version, on GPU machines the CUDA build.
$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# The demo trains the micro model on the default corpus (6 to 9 minutes on 2 CPU cores), then samples from it.
# Its run folder is output_micro/; run again, it resumes that run (a finished one is only evaluated and sampled).
# torch picks its own thread count for the training (the OMP_NUM_THREADS=1 above is for the test workers).
DEMO_DIR ?= output_micro
demo: install
	@bash scripts/install_corpus.sh || true
	env -u OMP_NUM_THREADS $(VENV)/bin/metai train-micro --output-dir $(DEMO_DIR) $$([ -e $(DEMO_DIR)/checkpoints/latest ] && echo --resume)
	$(VENV)/bin/metai generate --model-dir $(DEMO_DIR) --prompt "The secret of life is"

test: install
	$(VENV)/bin/nbdev-test --n-workers 2 --timing
	$(PY) -m pytest -q

lab: install
	$(VENV)/bin/jupyter lab nbs/

# Static HTML in _site/ (no Quarto needed); where quarto is on PATH, also nbdev's Quarto site in _docs/.
docs: install
	$(PY) scripts/build_docs.py _site
	@if command -v quarto >/dev/null; then $(VENV)/bin/nbdev-docs; else echo "docs: quarto not on PATH, skipped nbdev-docs (open _site/index.html)"; fi

clean:
	rm -rf _proc _docs _site
