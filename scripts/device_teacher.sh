#!/bin/bash
# One device call (<= 600 s, one H100): pretrain the tiny teacher on the GPU, export its EMA weights, score
# them with SynthBench (256 held-out seeds, 50 Euler steps, CFG 4) and send the model back as one archive
# under the 16 MB per-file limit. Every result is written into $OUT as soon as it exists (session 3 lost two
# models to one oversized archive, and a whole call's results to a late tar).
#
#   run(command="bash scripts/device_teacher.sh", carry=[".whl"])                     # from scratch
#   run(command="INIT=flgcore/assets/synth-tiny bash scripts/device_teacher.sh", carry=[".whl"])  # warm start
#   (session 11: INIT=flgcore/assets/synth-tiny BUDGET=450 STEPS=3200 LR=3e-4 finished its schedule in 5.2 min,
#   0.097 s/step, and the whole call in 450 s: average 0.640 -> 0.752. Session 21: three calls, each warm-started
#   from the last one's teacher-model.tgz, 0.752 -> 0.837 -> 0.845 -> 0.903; LOG.md has the commands)
#
# Env: BUDGET seconds of training (420), STEPS cosine length (6000), BATCH (128), LR (6e-4), WORKERS data
# processes (12), COMPILE (true: torch.compile the model in place; if that run dies before its first
# checkpoint, the rest of the budget trains eagerly), DEVICE (cuda; `DEVICE=cpu BUDGET=30 STEPS=4 BATCH=2`
# dry-runs the script here). diffusers travels as a wheel in .whl/ (the device image has torch, not diffusers).
set -u
if ! python3 -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20 OMP_NUM_THREADS=1
OUT=${OUT:-/tmp/out}; R=${R:-/tmp/runs}; mkdir -p $OUT $R
BUDGET=${BUDGET:-420} STEPS=${STEPS:-6000} BATCH=${BATCH:-128} LR=${LR:-6e-4} WORKERS=${WORKERS:-12}
COMPILE=${COMPILE:-true} DEVICE=${DEVICE:-cuda} INIT=${INIT:-} N=${N:-256}
flg() { python3 -m flgcore.cli "$@"; }
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"

T=$R/teacher
rm -rf $T  # a warm machine keeps /tmp: a previous call's run there would be resumed, under this call's config
train() {  # seconds, compile flag
  timeout "$1" python3 -m flgcore.cli pretrain --config configs/pretrain_synth_tiny.yaml out=$T device=$DEVICE threads=1 \
    workers=$WORKERS batch_size=$BATCH lr=$LR steps=$STEPS warmup=200 ema_decay=0.999 ckpt_every=200 compile="$2" \
    ${INIT:+init_from=$INIT} >>$OUT/teacher.log 2>&1
}
start=$SECONDS
train $BUDGET $COMPILE
if [ "$COMPILE" = true ] && ! ls $T/checkpoints/step_* >/dev/null 2>&1; then
  echo "compiled run left no checkpoint: training eagerly for the rest of the budget" | tee -a $OUT/teacher.log
  left=$((BUDGET - (SECONDS - start)))
  [ $left -gt 30 ] && train $left false
fi
flg pretrain --config $T/config.yaml --export-to $T/model >>$OUT/teacher.log 2>&1 || { tail -20 $OUT/teacher.log; exit 1; }
cp $T/log.jsonl $OUT/teacher.jsonl; cp $T/metrics.json $OUT/teacher-metrics.json
(cd $R && tar czf $OUT/teacher-model.tgz teacher/model teacher/config.yaml)
tail -1 $T/log.jsonl

flg eval --model $T/model --n $N --steps 50 --cfg 4 --out $R/eval-teacher device=$DEVICE videos=0 batch_size=256 >$OUT/eval.log 2>&1
cp $R/eval-teacher/metrics.json $OUT/eval-teacher.json
ls -la $OUT
python3 -c "import json; d=json.load(open('$OUT/eval-teacher.json')); print({k: round(v, 3) for k, v in d.items() if isinstance(v, float)})"
