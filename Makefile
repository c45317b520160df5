# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv if missing and install the project into it (again only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FLG := $(VENV)/bin/flg
STAMP := $(VENV)/.flgcore-installed
DEMO := runs/demo
MODEL ?= synth-tiny
STUDENT ?= synth-tiny-student
DEMO_N ?= 32
PYTEST_ARGS ?=

.PHONY: demo test test-all lint install clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned (2.13.0): a looser pin can pull a multi-GB CUDA build onto a CPU machine
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check flgcore tests scripts
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check flgcore tests scripts

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

demo: $(STAMP)
	@echo "== the teacher's blocks, and the shipped student's ($(STUDENT): 11 of them, 70 % of the block parameters)"
	$(FLG) blocks --model $(MODEL)
	$(FLG) blocks --model $(STUDENT)
	@echo "== prune 5 middle blocks, save, reload"
	$(FLG) prune --model $(MODEL) --drop 6,7,8,9,10 --out $(DEMO)/pruned
	$(FLG) blocks --model $(DEMO)/pruned
	@echo "== sample from the teacher (50 Euler steps + CFG) and from the student (4 steps, no CFG): mp4, gif and a PNG strip"
	$(FLG) sample --model $(MODEL) --seed 2000000000,2000000001 --out $(DEMO)/samples
	$(FLG) sample --model $(STUDENT) --seed 2000000000,2000000001 --out $(DEMO)/samples-student
	@echo "== how a student is made, in a few steps each (the shipped one's full recipe: LOG.md, 2026-12-01)"
	@echo "== Stage I (quick): block importance and a 70% keep set"
	$(FLG) stage1 --model $(MODEL) --n 16 --sigmas "[0.3, 0.7]" --retention 0.7 --out $(DEMO)/stage1
	@echo "== Stage II (quick, alpha 0.5: the testbed's setting, see LOG.md): dynamic probabilistic pruning, then the drop view's SynthBench table"
	$(FLG) stage2 --model $(MODEL) --selection $(DEMO)/stage1/selection.json --alpha 0.5 --steps 20 --batch_size 8 --ckpt_every 10 --out $(DEMO)/stage2
	$(FLG) eval --model $(DEMO)/stage2/model --view drop --n 16 --steps 25 --out $(DEMO)/eval-stage2-drop
	@echo "== Stage III (quick): a 4-step student of the kept blocks after 20 iterations, and its SynthBench table"
	$(FLG) stage3 --model $(DEMO)/stage2/model --steps 20 --batch_size 8 --ckpt_every 10 --out $(DEMO)/stage3
	$(FLG) eval --model $(DEMO)/stage3/student --n 16 --out $(DEMO)/eval-quick-student
	@echo "== the block-importance notebook (quick profile) -> $(DEMO)/notebooks/quick/01_block_importance/"
	$(FLG) notebooks run --profile quick --only 01_block_importance --out $(DEMO)/notebooks
	@echo "== the teacher and the shipped student on the same $(DEMO_N) held-out seeds (flg eval ... --n 256 for the LOG.md numbers)"
	$(FLG) eval model=$(MODEL) n=$(DEMO_N) out=$(DEMO)/eval-teacher
	$(FLG) eval --model $(STUDENT) --n $(DEMO_N) --out $(DEMO)/eval-student
	@echo "== student minus teacher per dimension, with 95% paired-bootstrap intervals"
	$(FLG) compare $(DEMO)/eval-student $(DEMO)/eval-teacher
	@echo "== speed: the 4-step 11-block student against the 50-step CFG teacher, measured and theoretical"
	$(FLG) bench --teacher $(MODEL) --student $(STUDENT) --n 8 --repeats 3 --out $(DEMO)/bench

clean-demo:
	rm -rf $(DEMO)
