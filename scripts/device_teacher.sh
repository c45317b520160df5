#!/bin/bash
# GPU session 3 (device tool, one H100): pretrain the tiny teacher longer than a CPU session can, then
# score every candidate with SynthBench (256 held-out seeds, 50 Euler steps, CFG 4). Results land in $OUT.
# Usage on the device machine: bash scripts/device_teacher.sh   (diffusers travels as a wheel in .whl/)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20 OMP_NUM_THREADS=1
OUT=${OUT:-/tmp/out}; R=/tmp/runs; mkdir -p $OUT $R
flg() { python3 -m flgcore.cli "$@"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, diffusers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"

# the shipped 1200-step CPU teacher, sampled on the GPU: must match its CPU numbers in LOG.md
flg eval --model synth-tiny --n 256 --steps 50 --cfg 4 --out $R/eval-cpu1200 device=cuda videos=0 batch_size=256 >$OUT/eval-cpu1200.log 2>&1 &

BUDGET=${BUDGET:-420}
run() {  # name, then config overrides
  name=$1; shift
  timeout $BUDGET python3 -m flgcore.cli pretrain --config configs/pretrain_synth_tiny.yaml out=$R/$name device=cuda threads=1 ckpt_every=250 "$@" >$OUT/$name.log 2>&1
  flg pretrain --config $R/$name/config.yaml --export-to $R/$name/model >>$OUT/$name.log 2>&1  # also if timed out
  cp $R/$name/log.jsonl $OUT/$name.jsonl
  flg eval --model $R/$name/model --n 256 --steps 50 --cfg 4 --out $R/eval-$name device=cuda videos=0 batch_size=256 >>$OUT/$name.log 2>&1
  cp $R/eval-$name/metrics.json $OUT/eval-$name.json
}
run b128 batch_size=128 lr=6e-4 steps=${STEPS_A:-6000} ema_decay=0.999 warmup=200 workers=6 &
run b256 batch_size=256 lr=8e-4 steps=${STEPS_B:-3500} ema_decay=0.999 warmup=200 workers=7 &
wait
cp $R/eval-cpu1200/metrics.json $OUT/eval-cpu1200.json
# one archive per model: a device call returns files of at most 16 MB (one ~10 MB model each; session 3 lost both in one)
cd $R && for name in b128 b256; do tar czf $OUT/model-$name.tgz $name/model $name/config.yaml; done && ls -la $OUT
for f in $OUT/eval-*.json; do python3 -c "import json,sys; d=json.load(open('$f')); print('$f'.split('/')[-1], {k: round(v,3) for k,v in d.items() if isinstance(v,float)})"; done
