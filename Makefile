# Two commands for a fresh clone:
#   make demo   set up .venv and start the Gradio Space on the shipped checkpoint
#   make test   set up .venv (+ headless Chromium for the browser tests) and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup browser demo predict test bench checkpoint-code clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip

# Reinstall only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[test,train,space]'
	touch $@

setup: $(VENV)/.installed

# Debian's Chromium for the browser tests (playwright cannot download browsers here).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/python space/app.py

# usage: make predict IMAGES="a.png b.png"
predict: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m modeling_hmer.predict $(IMAGES)

test: setup browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests -q

bench: setup
	$(BIN)/python -m train.bench

# checkpoints/*.py are what trust_remote_code runs: copy them from modeling_hmer/ the way save_pretrained does
# (tests/test_checkpoint.py fails when they differ).
checkpoint-code: setup
	$(BIN)/python -m modeling_hmer.checkpoint_code checkpoints

clean:
	rm -rf $(VENV) .pytest_cache
