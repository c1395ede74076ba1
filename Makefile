# largebatch: `make demo` and `make test` set everything up first (tools/setup.sh is idempotent).
PY      := .venv/bin/python
MPIRUN  := .venv/bin/mpirun
NP      ?= 2
RUN     ?= runs/demo
EPOCHS  ?= 8
DATA    := data/digits
# Open MPI refuses to start as root unless told; containers and CI run as root.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1

.PHONY: setup demo test clean

setup:
	@bash tools/setup.sh

$(DATA)/train: | setup
	$(PY) -m largebatch.data.digits $(DATA)

demo: setup $(DATA)/train
	$(MPIRUN) -np $(NP) -x OMP_NUM_THREADS=1 $(PY) pytorch_imagenet_resnet.py \
	    --train-dir $(DATA)/train --val-dir $(DATA)/val --log-dir $(RUN) \
	    --model resnet18 --image-size 32 --crop-scale 0.5,1 --batch-size 32 --val-batch-size 128 \
	    --epochs $(EPOCHS) --warmup-epochs 1 --base-op lars --base-lr 2 --wd 5e-5 --workers 1

test: setup
	$(PY) -m pytest tests -q -ra

clean:
	rm -rf runs data
