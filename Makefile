# largebatch: `make demo`, `make test` and `make test-unit` set everything up first (tools/setup.sh is idempotent).
PY      := .venv/bin/python
MPIRUN  := .venv/bin/mpirun
NP      ?= 2
RUN     ?= runs/demo
EPOCHS  ?= 8
# ENGINE=torch: torch.distributed, and setup skips the Horovod build (auto: Horovod under mpirun when it imports)
ENGINE  ?= auto
DATA    := data/digits
# Open MPI refuses to start as root unless told; containers and CI run as root.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1

.PHONY: setup demo test test-unit lint bench convergence clean

setup:
	@LARGEBATCH_HOROVOD=$(if $(filter torch,$(ENGINE)),skip,build) bash tools/setup.sh

$(DATA)/train: | setup
	$(PY) -m largebatch.data.digits $(DATA)

demo: setup $(DATA)/train
	$(MPIRUN) -np $(NP) -x OMP_NUM_THREADS=1 $(PY) pytorch_imagenet_resnet.py \
	    --train-dir $(DATA)/train --val-dir $(DATA)/val --log-dir $(RUN) \
	    --model resnet18 --image-size 32 --crop-scale 0.5,1 --batch-size 32 --val-batch-size 128 \
	    --epochs $(EPOCHS) --warmup-epochs 1 --base-op lars --bn-bias-separately --label-smoothing 0 --base-lr 2 --wd 5e-5 --workers 1 --engine $(ENGINE)

test: setup lint
	$(PY) -m pytest tests -q -ra

# The in-process tier: no mpirun, SLURM, DALI or GPU (markers in pyproject.toml); under two
# minutes on 2 cores. `make test` runs these and everything else.
test-unit: setup lint
	$(PY) -m pytest tests/unit -q -ra -m "not mpi and not slurm and not dali and not gpu"

# ruff (check and format, line length 120) over the whole tree; mypy over the package,
# lars.py, lamb.py and schedulers.py (settings in pyproject.toml).
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

# Ratios against baselines measured in the same run: bench/results/*.json, tables printed and
# collected in bench/results/benchmarks.md (docs/benchmarks.md). The GPU part skips without one.
bench: setup
	$(PY) bench/bench_train.py
	$(PY) bench/bench_epoch.py
	$(PY) bench/bench_optimizer.py
	@if [ -f bench/bench_input.py ]; then $(PY) bench/bench_input.py; fi
	$(PY) bench/bench_gpu.py
	$(PY) bench/tables.py

# Accuracy against batch size (8 to 512; SGD, LARS, LAMB; two budgets; sweeps, 5 seeds, checks) on the
# digits, about an hour on 2 cores: bench/results/convergence*
convergence: setup
	$(PY) bench/convergence.py

clean:
	rm -rf runs data
