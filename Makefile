# DreamTeacher pipeline. `make demo` runs everything on built-in data; `make test` runs the tests.
# Both create (or reuse) .venv and install what they need.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DT     := $(VENV)/bin/dreamteacher
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= pipeline.yaml

# Stage variables (empty = pipeline.yaml's value). ARGS passes any further KEY.PATH=VALUE overrides.
DATA    ?= demo
TEACHER ?=
T       ?=
MODE    ?=
BANK    ?=
STUDENT ?=
EXP     ?=
GPUS    ?= 1
TASK    ?=
CKPT    ?=
LABELS  ?=
ARGS    ?=
# Multi-node distill / finetune (docs/distill.md): run the same make command on every node with its NODE_RANK;
# MASTER is HOST:PORT of node 0, where torchrun's c10d rendezvous listens.
NNODES    ?= 1
NODE_RANK ?= 0
MASTER    ?= 127.0.0.1:29500
TORCHRUN_ARGS = $(if $(filter 1,$(NNODES)),--standalone --nproc_per_node=$(GPUS),--nnodes=$(NNODES) \
  --node-rank=$(NODE_RANK) --nproc-per-node=$(GPUS) --rdzv-backend=c10d --rdzv-endpoint=$(MASTER) \
  --rdzv-id=$(or $(EXP),dreamteacher))

opt = $(if $(2),$(1)=$(2))

.PHONY: venv demo test test-all lint format teacher encode interpret distill finetune bank-info bank-verify \
        bench-encode bench-bank bench-distill study study-mix gpu-wheels gpu-check clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(DT) demo --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

# The declared dependency floors (setup.cfg), installed as ==floor in a scratch venv, against the tests that use
# them. Slow (about 6.5 min on a 2-core VM: 4-5 min installing, torch mostly, 2 min of tests): not in `make test`.
.PHONY: test-floors
test-floors:
	scripts/check_floors.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

teacher: $(STAMP)
	$(DT) teacher --config $(CONFIG) teacher_train.data=$(DATA) $(ARGS)

encode: $(STAMP)
	$(DT) encode --config $(CONFIG) encode.data=$(DATA) $(call opt,encode.teacher,$(TEACHER)) \
	  $(call opt,encode.t,$(T)) $(call opt,encode.mode,$(MODE)) $(call opt,encode.bank,$(BANK)) $(ARGS)

distill: $(STAMP)
ifeq ($(GPUS)$(NNODES),11)
	$(DT) distill --config $(CONFIG) encode.data=$(DATA) $(call opt,distill.bank,$(BANK)) \
	  $(call opt,distill.student.name,$(STUDENT)) $(call opt,distill.exp,$(EXP)) $(ARGS)
else
	$(VENV)/bin/torchrun $(TORCHRUN_ARGS) -m dreamteacher distill --config $(CONFIG) encode.data=$(DATA) \
	  $(call opt,distill.bank,$(BANK)) $(call opt,distill.student.name,$(STUDENT)) $(call opt,distill.exp,$(EXP)) $(ARGS)
endif

interpret: $(STAMP)
	$(DT) interpret --config $(CONFIG) encode.data=$(DATA) $(call opt,interpret.data,$(LABELS)) \
	  $(call opt,interpret.bank,$(BANK)) $(ARGS)

finetune: $(STAMP)
ifeq ($(GPUS)$(NNODES),11)
	$(DT) finetune --config $(CONFIG) $(call opt,finetune.task,$(TASK)) $(call opt,finetune.ckpt,$(CKPT)) \
	  $(call opt,finetune.exp,$(EXP)) $(ARGS)
else
	$(VENV)/bin/torchrun $(TORCHRUN_ARGS) -m dreamteacher finetune --config $(CONFIG) \
	  $(call opt,finetune.task,$(TASK)) $(call opt,finetune.ckpt,$(CKPT)) $(call opt,finetune.exp,$(EXP)) $(ARGS)
endif

bank-info: $(STAMP)
	$(DT) bank info $(BANK)

bank-verify: $(STAMP)
	$(DT) bank verify $(BANK)

bench-encode: $(STAMP)
	$(PY) benchmarks/bench_encode.py $(ARGS)

bench-bank: $(STAMP)
	$(PY) benchmarks/bench_bank.py $(ARGS)

bench-distill: $(STAMP)
	$(PY) benchmarks/bench_distill.py $(ARGS)

# The cache-cost study (docs/cache-cost.md): about an hour on 2 CPU cores; ARGS=--quick for the ~10-minute grid,
# ARGS=--grid=compact for PCA on top of the shipped defaults (5 seeds, ~26 min; docs/cache-cost-compact.md).
study: $(STAMP)
	$(PY) benchmarks/study_cache_cost.py $(ARGS)

# Mix vs feature distillation over distill seeds (benchmarks/study_mix.py): about 16 min on 2 CPU cores after
# `make demo`, whose bank, interpreter and seed-0 runs it reuses.
study-mix: $(STAMP)
	$(PY) benchmarks/study_mix.py $(ARGS)

# GPU hot paths on one CUDA GPU (benchmarks/gpu_check.py): one markdown table in < 8 min; without a GPU it says so
# and exits 0 (not part of `make test`). The GPU machine's own Python (GPU_PYTHON; it has torch, torchvision, timm,
# safetensors, tensorboard) gets the project's other dependencies from the wheels `make gpu-wheels` downloads here.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_WHEELS ?= .gpu-wheels

gpu-wheels:
	PIP="$(VENV)/bin/pip" scripts/gpu_wheels.sh $(GPU_WHEELS)

gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --wheels $(GPU_WHEELS) $(ARGS)

clean:
	rm -rf data banks runs .pytest_cache
