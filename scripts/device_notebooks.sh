#!/bin/bash
# One device call (<= 600 s, one GPU): execute analysis notebooks in the `full` profile, and send back their
# tables, figures and executed notebooks (no weights) plus notebook 02's best Stage-II model (what 03 and 05
# start from), each archive under the 16 MB per-file limit. A later call that carries these archives back
# (IN=) continues where this one stopped: finished notebooks and finished runs inside a sweep are reused.
#
#   bash scripts/device_wheels.sh; mkdir -p .dev      # here, once: wheels for diffusers + papermill
#   run(command="MODEL=.dev/teacher-model.tgz bash scripts/device_notebooks.sh", carry=[".whl", ".dev"])
#   run(command="IN=.dev MODEL=.dev/teacher-model.tgz NOTEBOOKS='03_stage3_ablations 04_steps_vs_retention' \
#       bash scripts/device_notebooks.sh", carry=[".whl", ".dev"])   # after copying the returned files into .dev
#
# Env: MODEL (synth-tiny, a model directory, or device_teacher.sh's teacher-model.tgz), NOTEBOOKS (names, in
# order; default 01 and 02), BUDGET seconds for the notebooks (500), PROFILE (full), IN (a folder holding the
# archives a previous call returned), DEVICE (cuda; `DEVICE=cpu PROFILE=quick` dry-runs the script here).
# The run folders live under a fixed path (/tmp/flg) so that a later call sees the same parameters and reuses.
set -u
if ! python3 -c "import diffusers, papermill, ipykernel" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
OUT=${OUT:-/tmp/out}; R=${R:-/tmp/flg}; mkdir -p $OUT $R
MODEL=${MODEL:-synth-tiny} NOTEBOOKS=${NOTEBOOKS:-01_block_importance 02_stage2_ablations}
BUDGET=${BUDGET:-500} PROFILE=${PROFILE:-full} DEVICE=${DEVICE:-cuda} IN=${IN:-}
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

if [ -n "$IN" ]; then  # a previous call's results: run folders under $R, figures/ into the checkout
  for a in "$IN"/notebooks.tgz "$IN"/stage2-best.tgz; do [ -f "$a" ] && tar xzf "$a" -C $R; done
  [ -d $R/figures ] && cp -r $R/figures/. figures/
fi
case "$MODEL" in
  *.tgz) tar xzf "$MODEL" -C $R && MODEL=$R/teacher/model ;;  # device_teacher.sh packs teacher/model
esac

only=(); for n in $NOTEBOOKS; do only+=(--only "$n"); done
timeout "$BUDGET" python3 -m flgcore.cli notebooks run --profile $PROFILE "${only[@]}" --out $R/notebooks \
  -p model=$MODEL -p device=$DEVICE 2>&1 | tee $OUT/notebooks.log | grep -v "it/s\]$"
echo "notebooks exit ${PIPESTATUS[0]} (124: stopped at the budget; a later call with IN= continues)"
pkill -f ipykernel_launcher  # a kernel that outlived the timeout would hold the GPU

# results without weights; the figures the full profile regenerated in the checkout go along
rm -rf $R/figures && cp -r figures $R/figures
(cd $R && tar czf $OUT/notebooks.tgz --exclude=checkpoints --exclude='*.safetensors' --exclude='*.mp4' \
  notebooks figures)
best=$(python3 -c "from flgcore import report; print(report.best_stage2_model('$R/notebooks/$PROFILE'))" 2>/dev/null)
if [ -n "$best" ] && [ -d "$best" ]; then
  (cd $R && tar czf $OUT/stage2-best.tgz "${best#$R/}")
fi
ls -la $OUT
for f in $R/notebooks/$PROFILE/*/*.csv; do echo "== $f"; head -12 "$f"; done 2>/dev/null
