# synthdet: the two commands are `make demo` (set up, run the pipeline on the defaults) and
# `make test` (set up, run the tests). Both work on a fresh clone, offline but for package registries.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml requirements/constraints.txt | sha256sum | cut -c1-12)

.PHONY: setup demo smoke test test-fast lint models clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	@command -v git >/dev/null || (apt-get update && apt-get install -y git)
	@# Debian's Chromium for the browser tests (playwright drives it; no browser download).
	@command -v chromium >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)
	@# Debian's PostgreSQL for the back-end tests (they start their own server from a temporary folder).
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# pip (not uv/poetry): torch and torchvision come from this machine's local wheels.
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

# The shipped default models (models/generator, models/validator.pt) need nothing built. The tests and
# `make smoke` use tiny random-weight models made from configs, and the demo evaluates on the world's
# held-out test sets and mixes in common images (rendered in about 20 s).
models: setup models/tiny/validator.pt
models/tiny/validator.pt:
	$(BIN)/synthdet tiny-models --out models/tiny

data/world/test/rare.yaml: tasks/world.py | setup
	$(BIN)/synthdet world --only test

# The demo's dataset mixes in common images (dataset.real), so the fine-tune does not forget them.
data/world/common_train/data.yaml: tasks/world.py | setup
	$(BIN)/synthdet world --only common_train

# Generation starts from the mean latent of two scarce real images per rare condition (generate.start_means),
# and the dataset's recoloured common images take those images' colours (dataset.restyle).
data/world/rare_scarce/captions.parquet: tasks/world.py | setup
	$(BIN)/synthdet world --only rare_scarce

demo: setup data/world/test/rare.yaml data/world/common_train/data.yaml data/world/rare_scarce/captions.parquet
	$(BIN)/synthdet run --params params.yaml

smoke: models
	$(BIN)/synthdet run --params params.smoke.yaml

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf workspace models/tiny data/world/test data/world/common_train data/world/rare_scarce
