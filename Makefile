# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv in the checkout and install everything they need first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# `make install GPU=1` installs faiss-gpu instead of faiss-cpu (and leaves out the Milvus extra,
# whose milvus-lite requires faiss-cpu; its tests skip without it).
EXTRAS := $(if $(GPU),gpu,cpu,milvus),embedded,dev
STAMP  := $(VENV)/.installed-$(if $(GPU),gpu,cpu)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned, so nothing later can pull an unpinned (CUDA, multi-GB) build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/samestyle demo

test: install
	# The browser test drives Debian's chromium; it skips (saying why) if this cannot install it.
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver) \
		|| echo "chromium could not be installed: tests/integration/test_browser.py will skip"
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not integration"

clean:
	rm -rf $(VENV) build *.egg-info
