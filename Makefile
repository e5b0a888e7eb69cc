# One virtualenv in the repo (.venv), installed from pyproject.toml: the only source of
# versions. Every target installs what it needs, so a fresh clone needs nothing by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   := data/shapes
RUN    ?= runs/demo
CHECKPOINT ?= demo/tiny.pt

.PHONY: setup test test-all demo-model train evaluate val-data clean serve bench mutants

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[train,export,serve,cpu,dev]"
	@touch $@

setup: $(STAMP)

test: setup triton-server browser repository compose-cli
	$(PY) -m pytest -q -m "not slow"

# Mutation check (issue 16): each mutant in mutants/*.toml is put into a scratch copy of
# this tree, one at a time, and only its named tests run there; reports survivors and
# stale entries, and fails unless every mutant is killed. MUTANTS="glob ..." selects by id
# or list file (e.g. MUTANTS="nms-* service.toml"), JOBS sets the copies run side by side.
MUTANTS ?=
JOBS    ?= 2
mutants: setup triton-server browser repository
	$(PY) mutants/run.py -j $(JOBS) $(foreach m,$(MUTANTS),-k '$(m)')

# Fuzz target (issue 14): schemathesis over the OpenAPI schema with all its checks, real
# images in generated requests (tests/test_service_fuzz.py); >= 2000 requests. `make test`
# runs the same file with 8 examples per operation and mode.
.PHONY: fuzz
fuzz: setup repository
	FUZZ_EXAMPLES=150 FUZZ_MIN_REQUESTS=2000 $(PY) -m pytest -q -s tests/test_service_fuzz.py

# Debian's docker-compose (the CLI only, no engine) for tests/test_compose.py, which checks
# that `docker-compose config` accepts compose.yaml's gpu and cpu profiles
.PHONY: compose-cli
compose-cli:
	@test -x /usr/bin/docker-compose || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose)

# Overload, big images, slow URL origin, Triton restart and soak figures against the real
# server (issue 14), appended to bench/results/soak.jsonl (bench/soak.py).
.PHONY: soak
soak: setup repository triton-server
	$(PY) -m bench.soak $(BENCH_FLAGS)

# The overload figures alone (finding 4, about two minutes): the sustainable load, an open
# loop offering 4x it side by side with the best closed loop, 64 clients retrying at once vs honouring Retry-After; 503 p50/p99,
# event-loop lag and the load average next to them. BENCH_FLAGS=--record: bench/results/.
.PHONY: overload
overload: setup repository
	$(PY) -m bench.soak --scenarios overload $(BENCH_FLAGS)

# Debian's chromium + chromedriver for the demo page's browser test
# (tests/test_service_browser.py); installed only when missing (CI runs as root).
.PHONY: browser
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

# The real tritonserver (from the nvidia-pytriton wheel, unpacked into .cache/tritonserver,
# never installed into the venv: it pins numpy<2) and the models' own small venv there
# (numpy<2 + onnxruntime: the python backend stub breaks under numpy 2) for the Triton test.
.PHONY: triton-server
triton-server: setup
	$(PY) -m export.local_triton install

test-all: setup
	$(PY) -m pytest -q

$(DATA)/val/instances.json: | setup
	$(PY) -m training.generate --out $(DATA)/val --split val --num-images 500 --seed 1

val-data: $(DATA)/val/instances.json

# Trains the tiny preset on the shapes world in two stages on a 2-core CPU: detection and
# grounding, then every task together, detection, grounding, VQA and captioning, from
# those weights; each stage ends at its step count or its time budget (time_budget_min in
# the configs: 25 + 20 minutes), whichever comes first, with the learning rate annealed on
# the way; evaluates the result on the 500-image val split and writes the demo checkpoint.
# OMP_WAIT_POLICY=PASSIVE: with 2 threads on 2 shared cores, spinning OpenMP threads made
# a step several times slower whenever another process held a core (measured).
demo-model: export OMP_WAIT_POLICY = PASSIVE
demo-model: setup val-data
	$(PY) -m training.train --config configs/demo.json --out-dir $(RUN) --val-dir $(DATA)/val
	$(PY) -m training.train --config configs/demo-multitask.json --init-from $(RUN)/best.pt \
		--out-dir $(RUN)-multitask --val-dir $(DATA)/val
	$(PY) -m training.evaluate --checkpoint $(RUN)-multitask/best.pt --data $(DATA)/val --out $(RUN)-multitask/eval.json
	$(PY) -m training.release --checkpoint $(RUN)-multitask/best.pt --out $(CHECKPOINT)

# Any TrainConfig field can be passed through ARGS, e.g. make train ARGS="--max-steps 100".
train: setup
	$(PY) -m training.train --out-dir $(RUN) $(ARGS)

evaluate: setup val-data
	$(PY) -m training.evaluate --checkpoint $(CHECKPOINT) --data $(DATA)/val

# Serves $(CHECKPOINT) (default: the demo model) on http://$(HOST):$(PORT) with the embedded
# ONNX Runtime backend; renders $(REPOSITORY) from it first unless it already holds exactly
# that checkpoint (the manifest's sha256) with every ONNX file (a fresh clone has none).
HOST ?= 127.0.0.1
PORT ?= 8000
serve: setup
	@$(MAKE) --no-print-directory repository
	GLIPV2_HOST=$(HOST) GLIPV2_PORT=$(PORT) GLIPV2_REPOSITORY=$(REPOSITORY) $(PY) -m service

# Benchmarks print ratios measured side by side in one run; results are appended to
# runs/bench/ (ignored by git). `make bench-record` appends them to the committed
# reference results in bench/results/ instead (on purpose, for a README figure).
BENCH_FLAGS ?=
bench: setup repository triton-server
	$(PY) -m bench.export_latency --checkpoint $(CHECKPOINT) $(BENCH_FLAGS)
	$(PY) -m bench.caption_throughput --repository $(REPOSITORY) --beam-size 1 --backends embedded,triton,triton-steps $(BENCH_FLAGS)
	$(PY) -m bench.caption_throughput --repository $(REPOSITORY) --beam-size 1,3 --backends embedded,triton $(BENCH_FLAGS)
	$(PY) -m bench.caption_throughput --repository $(REPOSITORY) --beam-size 3 --checked off,on --backends embedded,triton $(BENCH_FLAGS)
	$(PY) -m bench.gateway --repository $(REPOSITORY) $(BENCH_FLAGS)
	$(PY) -m bench.official_latency $(BENCH_FLAGS)

.PHONY: bench-record
bench-record:
	@$(MAKE) --no-print-directory bench BENCH_FLAGS=--record

clean:
	rm -rf $(VENV) data runs .cache

# Triton model repository (issue 4): ONNX graphs + config.pbtxt + manifest.json rendered
# from a checkpoint. FLAVOUR: cpu (python backend + ONNX Runtime, what the tests serve),
# gpu (tensorrt_plan; build model.plan with `python -m export.tensorrt` on a GPU host) or
# gpu-onnx (onnxruntime + TensorRT fp16). Configs and manifest are in git, weights are not.
FLAVOUR    ?= cpu
TOP_K      ?= 100
MAX_BATCH  ?= 8
# the committed cpu repository is model_repository/; GPU flavours render into their own folder
# (model_repository-gpu, model_repository-gpu-onnx; not in git) so they never overwrite it.
# Any checkpoint other than the demo model renders next to itself (runs/x/best.pt ->
# runs/x/best-model_repository/), so serving your own model never rewrites files in git.
DEMO_CHECKPOINT := demo/tiny.pt
REPOSITORY_NAME  = $(if $(filter cpu,$(FLAVOUR)),model_repository,model_repository-$(FLAVOUR))
REPOSITORY ?= $(if $(filter $(DEMO_CHECKPOINT),$(CHECKPOINT)),$(REPOSITORY_NAME),$(basename $(CHECKPOINT))-$(REPOSITORY_NAME))

# Renders $(REPOSITORY) from $(CHECKPOINT) unless it already is exactly what that would
# write (same checkpoint bytes, settings, configs; every ONNX file present).
.PHONY: repository
repository: setup
	@$(PY) -m export.build --checkpoint $(CHECKPOINT) --out $(REPOSITORY) --flavour $(FLAVOUR) \
		--top-k $(TOP_K) --max-batch-size $(MAX_BATCH) --if-changed $(if $(IMAGE_HW),--image-hw $(IMAGE_HW))

# CHECKPOINT may also be an official GLIP-T file (glip_tiny_model_o365_goldg.pth), converted
# on the fly; IMAGE_HW="H W" exports at another canvas (default: the checkpoint's).
IMAGE_HW ?=
.PHONY: export
export: setup
	$(PY) -m export.build --checkpoint $(CHECKPOINT) --out $(REPOSITORY) --flavour $(FLAVOUR) \
		--top-k $(TOP_K) --max-batch-size $(MAX_BATCH) $(if $(IMAGE_HW),--image-hw $(IMAGE_HW))

# compose.yaml's cpu profile brought up for real with a Docker engine of the test's own
# (installs docker.io, docker-compose and debootstrap when missing; builds a Debian base
# image, the gateway and the cpu-flavour Triton images; 1-2 minutes when the images are
# cached, 10-15 on a first run). Not part of `make test` (time budget); run before a release.
.PHONY: compose-test
compose-test: setup repository
	$(PY) -m pytest -q -m compose tests/test_compose.py -p no:cacheprovider

# The first thing to run on a GPU host (under 10 minutes): driver, ONNX Runtime on CUDA,
# embedded latency GPU vs CPU, Triton under concurrency, the compose GPU profile with
# TensorRT parity; figures in bench/results/gpu_check-<GPU>.json.
.PHONY: gpu-check
gpu-check: setup repository triton-server
	@$(PY) -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" || \
		($(PY) -m pip uninstall -y -q onnxruntime && $(PY) -m pip install -q -e ".[gpu]")
	$(PY) -m bench.gpu_check
