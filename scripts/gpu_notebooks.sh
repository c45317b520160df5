#!/bin/bash
# Execute the analysis notebooks in the `full` profile on one GPU (an H100 or H200): `flg notebooks run` passes
# device=cuda to every stage and evaluation and trains 4 runs of a sweep at once. Finished notebooks, and finished
# runs inside a sweep, are reused: run it again (or with later NOTEBOOKS) and it continues where it stopped.
# Needs torch with CUDA and the project with its notebook dependencies (`pip install -e '.[dev]'`: papermill and a
# Jupyter kernel); on a GPU machine without internet, the wheels that `scripts/gpu_wheels.sh` writes into .whl/.
#
#   bash scripts/gpu_notebooks.sh                                              # 01 and 02 on synth-tiny
#   NOTEBOOKS='03_stage3_ablations 04_steps_vs_retention 05_method_comparison' bash scripts/gpu_notebooks.sh
#   MODEL=runs/gpu-teacher/teacher/model bash scripts/gpu_notebooks.sh         # on a teacher from gpu_teacher.sh
#
# Env: MODEL (synth-tiny, or a flgcore model directory), NOTEBOOKS (names, in order; default 01 and 02), PROFILE
# (full), RUNS (runs/notebooks), DEVICE (cuda; `DEVICE=cpu PROFILE=quick` dry-runs the script on a CPU). The full
# profile of the shipped synth-tiny regenerates the committed figures/; any other model's figures stay in its
# run folders.
set -u
cd "$(dirname "$0")/.."
if ! python3 -c "import diffusers, papermill, ipykernel" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
MODEL=${MODEL:-synth-tiny} NOTEBOOKS=${NOTEBOOKS:-01_block_importance 02_stage2_ablations}
PROFILE=${PROFILE:-full} RUNS=${RUNS:-runs/notebooks} DEVICE=${DEVICE:-cuda}
mkdir -p $RUNS
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

only=(); for n in $NOTEBOOKS; do only+=(--only "$n"); done
python3 -m flgcore.cli notebooks run --profile $PROFILE "${only[@]}" --out $RUNS -p model=$MODEL -p device=$DEVICE 2>&1 \
  | tee $RUNS/gpu_notebooks.log | grep -v "it/s\]$"
echo "notebooks exit ${PIPESTATUS[0]}"
for f in $RUNS/$PROFILE*/*/*.csv; do echo "== $f"; head -12 "$f"; done 2>/dev/null
