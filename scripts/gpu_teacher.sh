#!/bin/bash
# Pretrain the tiny teacher on one GPU (an H100 or H200), export its EMA weights and score them with SynthBench
# (256 held-out seeds, 50 Euler steps, CFG 4). Needs torch with CUDA and the project installed (`pip install -e .`);
# on a GPU machine without internet, the wheels that `scripts/gpu_wheels.sh` writes into .whl/ are installed first.
#
#   bash scripts/gpu_teacher.sh                                          # from scratch
#   INIT=flgcore/assets/synth-tiny bash scripts/gpu_teacher.sh           # warm start from the shipped teacher
#
# How the shipped teachers were made (LOG.md has every command and score): synth-tiny v2 is v1 warm-started with
# INIT=flgcore/assets/synth-tiny BUDGET=450 STEPS=3200 LR=3e-4 (its whole cosine in 5.2 min on one H100, 0.097 s per
# step; average 0.640 -> 0.752); v3 is three runs, each warm-started from the one before (0.752 -> 0.837 -> 0.845 -> 0.903).
#
# Env: CONFIG (configs/pretrain_synth_tiny.yaml; configs/pretrain_synth_deep.yaml for the 32-block teacher), R (runs/gpu-teacher: the run, its export in $R/teacher/model, its evaluation in $R/eval-teacher), BUDGET
# seconds of training (0: no limit; a run stopped at its budget is exported from its last checkpoint), STEPS
# cosine length (6000), BATCH (128), LR (6e-4), WORKERS data processes (12), COMPILE (true: torch.compile the
# model in place; if that run dies before its first checkpoint, the rest of the budget trains eagerly), N
# evaluation seeds (256), DEVICE (cuda; `DEVICE=cpu BUDGET=30 STEPS=4 BATCH=2` dry-runs the script on a CPU).
set -u
cd "$(dirname "$0")/.."
if ! python3 -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20 OMP_NUM_THREADS=1
R=${R:-runs/gpu-teacher}; mkdir -p $R
BUDGET=${BUDGET:-0} STEPS=${STEPS:-6000} BATCH=${BATCH:-128} LR=${LR:-6e-4} WORKERS=${WORKERS:-12}
COMPILE=${COMPILE:-true} DEVICE=${DEVICE:-cuda} INIT=${INIT:-} N=${N:-256} CONFIG=${CONFIG:-configs/pretrain_synth_tiny.yaml}
flg() { python3 -m flgcore.cli "$@"; }
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"

T=$R/teacher
rm -rf $T  # start from an empty run folder: a run left there would be resumed, and INIT ignored
train() {  # seconds (0: no limit), compile flag
  timeout "$1" python3 -m flgcore.cli pretrain --config $CONFIG out=$T device=$DEVICE threads=1 \
    workers=$WORKERS batch_size=$BATCH lr=$LR steps=$STEPS warmup=200 ema_decay=0.999 ckpt_every=200 compile="$2" \
    ${INIT:+init_from=$INIT} >>$R/teacher.log 2>&1
}
start=$SECONDS
train $BUDGET $COMPILE
if [ "$COMPILE" = true ] && ! ls $T/checkpoints/step_* >/dev/null 2>&1; then
  echo "compiled run left no checkpoint: training eagerly" | tee -a $R/teacher.log
  left=0; [ "$BUDGET" -gt 0 ] && left=$((BUDGET - (SECONDS - start)))
  [ "$BUDGET" -eq 0 ] || [ $left -gt 30 ] && train $left false
fi
flg pretrain --config $T/config.yaml --export-to $T/model >>$R/teacher.log 2>&1 || { tail -20 $R/teacher.log; exit 1; }
tail -1 $T/log.jsonl

flg eval --model $T/model --n $N --steps 50 --cfg 4 --out $R/eval-teacher device=$DEVICE videos=0 batch_size=256 >$R/eval.log 2>&1
python3 -c "import json; d=json.load(open('$R/eval-teacher/metrics.json')); print({k: round(v, 3) for k, v in d.items() if isinstance(v, float)})"
echo "teacher: $T/model (use it as MODEL=$T/model in scripts/gpu_notebooks.sh, or copy it over flgcore/assets/synth-tiny)"
