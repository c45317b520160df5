#!/bin/bash
# GPU session 3, call 2 (one H100): the tiny teacher pretrained on the GPU (TF32), then Stages I-III on it
# with SynthBench on 256 held-out seeds at each step. Every phase has a time cap so that results come back.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20 OMP_NUM_THREADS=1
OUT=${OUT:-/tmp/out}; R=/tmp/runs; mkdir -p $OUT $R; L=$R/logs; mkdir -p $L
flg() { python3 -m flgcore.cli "$@"; }
ev() {  # name model [overrides]: SynthBench, 256 held-out seeds, the model's own sampler unless overridden
  name=$1; model=$2; shift 2
  timeout 60 python3 -m flgcore.cli eval --model $model --n 256 --out $R/eval-$name device=cuda videos=0 batch_size=256 "$@" >$L/eval-$name.log 2>&1
}
T=$R/teacher
timeout ${BUDGET:-280} python3 -m flgcore.cli pretrain --config configs/pretrain_synth_tiny.yaml out=$T device=cuda threads=1 workers=12 \
  batch_size=128 lr=6e-4 steps=${STEPS:-2800} warmup=200 ema_decay=0.999 ckpt_every=250 >$L/teacher.log 2>&1
flg pretrain --config $T/config.yaml --export-to $T/model >>$L/teacher.log 2>&1
tail -1 $T/log.jsonl
ev teacher $T/model --steps 50 --cfg 4 &
timeout 60 python3 -m flgcore.cli stage1 --config configs/stage1_synth_tiny.yaml model=$T/model out=$R/s1 device=cuda threads=1 >$L/s1.log 2>&1
wait
DROP=$(python3 -c "import json; print(json.load(open('$R/s1/selection.json'))['dropped'])" | tr -d ' ')
echo "stage1 drop $DROP"
ev skip $T/model --steps 50 --cfg 4 drop=$DROP &
s2() { name=$1; shift; timeout 120 python3 -m flgcore.cli stage2 --config configs/stage2_synth_tiny.yaml model=$T/model selection=$R/s1/selection.json out=$R/$name device=cuda threads=1 "$@" >$L/$name.log 2>&1; ev $name $R/$name/model view=drop --steps 50 --cfg 4; }
s2 s2-a1-lr2e-4 &
s2 s2-a1-lr2e-5 lr=2e-5 steps=600 &
s2 s2-a05-lr2e-4 alpha=0.5 &
s2 s2-a05-lr2e-5 alpha=0.5 lr=2e-5 steps=600 &
wait
BEST=$(python3 -c "
import json, glob
s = {p.split('eval-')[1]: json.load(open(p + '/metrics.json'))['average'] for p in glob.glob('$R/eval-s2-*') if __import__('os').path.exists(p + '/metrics.json')}
print(max(s, key=s.get))")
echo "best stage2: $BEST"
s3() { name=$1; shift; timeout 130 python3 -m flgcore.cli stage3 --config configs/stage3_synth_tiny.yaml out=$R/$name device=cuda threads=1 "$@" >$L/$name.log 2>&1; ev $name $R/$name/student; }
s3 s3 model=$R/$BEST/model &
s3 dmd2 model=$T/model retention=1.0 beta2=0 &
wait
cd $R && for d in eval-* s1 s2-* s3 dmd2 teacher; do cp -r --parents $d/*.json $d/*.yaml $d/*.jsonl $d/*.csv logs/ 2>/dev/null; done
tar czf $OUT/logs.tgz logs
tar czf $OUT/teacher.tgz teacher/model; tar czf $OUT/stage2.tgz $BEST/model; tar czf $OUT/student.tgz s3/student; tar czf $OUT/dmd2.tgz dmd2/student
ls -la $OUT
for f in $R/eval-*/metrics.json; do python3 -c "import json; d=json.load(open('$f')); print('$f'.split('/')[-2].ljust(24), ' '.join(f'{k[:6]}={d[k]:.3f}' for k in ['average','i2v_subject','subject_consistency','motion_smoothness','dynamic_degree','imaging_quality','temporal_flickering','text_alignment','frechet_distance']), 'nfe', d.get('nfe'))"; done
