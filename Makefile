# One virtualenv in the repo (.venv), installed from pyproject.toml: the only source of
# versions. Every target installs what it needs, so a fresh clone needs nothing by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   := data/shapes
RUN    ?= runs/demo
CHECKPOINT ?= demo/tiny.pt

.PHONY: setup test test-all demo-model train evaluate val-data clean serve

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[train,dev]"
	@touch $@

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q

$(DATA)/val/instances.json: | setup
	$(PY) -m training.generate --out $(DATA)/val --split val --num-images 500 --seed 1

val-data: $(DATA)/val/instances.json

# Trains the tiny preset on the shapes world (about 25 minutes on a 2-core CPU),
# evaluates it on the 500-image val split and writes the small demo checkpoint.
demo-model: setup val-data
	$(PY) -m training.train --config configs/demo.json --out-dir $(RUN) --val-dir $(DATA)/val
	$(PY) -m training.evaluate --checkpoint $(RUN)/best.pt --data $(DATA)/val --out $(RUN)/eval.json
	$(PY) -m training.release --checkpoint $(RUN)/best.pt --out $(CHECKPOINT)

# Any TrainConfig field can be passed through ARGS, e.g. make train ARGS="--max-steps 100".
train: setup
	$(PY) -m training.train --out-dir $(RUN) $(ARGS)

evaluate: setup val-data
	$(PY) -m training.evaluate --checkpoint $(CHECKPOINT) --data $(DATA)/val

serve:
	@echo "make serve arrives with the gateway (issue 5); see README" && exit 1

clean:
	rm -rf $(VENV) data runs
