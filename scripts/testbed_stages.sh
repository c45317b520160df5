#!/bin/bash
# Every number of REPRODUCTION.md's testbed rows for Stages I-III, on the shipped teacher, on a 2-core CPU
# (~2 h: each lane trains a 2000-step Stage II): Stage I, then two lanes of one thread each, side by side.
# Logs and run folders under runs/.
#
#   bash scripts/testbed_stages.sh            # after a new teacher is shipped as synth-tiny
set -eu
cd "$(dirname "$0")/.."
flg() { .venv/bin/flg "$@"; }
S4='sigmas=[1.0, 0.879808247089386, 0.6997005939483643, 0.4000000059604645]'  # the students' 4 sigmas

mkdir -p runs/previous && for r in stage1-synth-tiny stage2-synth-tiny stage2-alpha1 stage3-init stage3-synth-tiny \
  eval-teacher-n256 eval-teacher-4step eval-skiponly eval-stage2-alpha1-drop eval-stage2-drop eval-stage3-init eval-stage3; do
  [ -d runs/$r ] && rm -rf runs/previous/$r && mv runs/$r runs/previous/   # finished runs would be reused, not redone
done
flg stage1 --config configs/stage1_synth_tiny.yaml threads=2

lane_a() {  # the teacher on the tables' 256 seeds (both samplers); skipping only; Stage II at alpha 1 (Table 4)
  flg eval model=synth-tiny n=256 threads=1 out=runs/eval-teacher-n256
  flg eval model=synth-tiny sampler=fewstep cfg=1 "$S4" n=256 threads=1 out=runs/eval-teacher-4step
  drop=$(python3 -c "import json; print(json.load(open('runs/stage1-synth-tiny/selection.json'))['dropped'])")
  flg eval model=synth-tiny "drop=$drop" n=64 threads=1 out=runs/eval-skiponly
  flg stage2 --config configs/stage2_synth_tiny.yaml threads=1 alpha=1.0 out=runs/stage2-alpha1
  flg eval model=runs/stage2-alpha1/model view=drop n=64 threads=1 out=runs/eval-stage2-alpha1-drop
}
lane_b() {  # Stage II at alpha 0.5 (the committed config), the Stage-III student before and after Stage III
  flg stage2 --config configs/stage2_synth_tiny.yaml threads=1
  flg eval model=runs/stage2-synth-tiny/model view=drop n=64 threads=1 out=runs/eval-stage2-drop
  flg stage3 --config configs/stage3_synth_tiny.yaml threads=1 steps=0 out=runs/stage3-init
  flg eval model=runs/stage3-init/student n=256 threads=1 out=runs/eval-stage3-init
  flg stage3 --config configs/stage3_synth_tiny.yaml threads=1
  flg eval model=runs/stage3-synth-tiny/student n=256 threads=1 out=runs/eval-stage3
}
lane_a >runs/lane_a.log 2>&1 &
lane_b >runs/lane_b.log 2>&1 &
wait
