#!/bin/bash
# Fig. 1's grid again with the best Stage II found (`views: both`, `target: frozen`, alpha 1, 400 steps at batch 16):
# for each retention given, Stage I's one-shot keep set (n = 64, 5 sigmas), that Stage II, and the configs' Stage III
# (configs/stage3_synth_tiny.yaml) at each student step count; retention 1.0 is DMD2 from the teacher (every block
# kept, beta2 0, as notebook 04 makes it). Every student is scored on the validation seeds 1000-1063 beside the
# teacher (50 Euler steps + CFG), paired against the best student with 95 % bootstrap intervals (<R>/fig1.md).
# One CPU thread: ~30 min per Stage II, ~20 min per Stage III. Finished steps are skipped, a killed one resumes; give
# disjoint retentions to two processes to use two cores, then run it once more with no argument for the table.
#
#   bash scripts/testbed_fig1_again.sh 0.8 0.6 & bash scripts/testbed_fig1_again.sh 0.7 1.0; bash scripts/testbed_fig1_again.sh
#
# Env: R (runs/stage2-diagnosis: the 70 % Stage II and its 4-step student of scripts/testbed_stage2_diagnosis.sh and
# scripts/testbed_claims_again.sh are reused), STEPS (student steps of the pruned rows, "4"), FULL_STEPS ("1 2 4"),
# S2_STEPS (400), QUICK=1 (a smoke run of a few iterations: sizes, not results).
set -u
cd "$(dirname "$0")/.."
flg() { nice -n 19 .venv/bin/flg "$@"; }
export OMP_NUM_THREADS=1
R=${R:-runs/stage2-diagnosis} STEPS=${STEPS:-4} FULL_STEPS=${FULL_STEPS:-1 2 4} S2_STEPS=${S2_STEPS:-400}
SIGMAS="[0.1, 0.3, 0.5, 0.7, 0.9]"
EV="n=64 seed_offset=1000 threads=1" S1N=64 S3N=""
if [ "${QUICK:-0}" = 1 ]; then EV="n=4 seed_offset=1000 threads=1"; S1N=8 S2_STEPS=2 S3N="steps=2 batch_size=2"; fi
S3="flg stage3 --config configs/stage3_synth_tiny.yaml threads=1 $S3N"
mkdir -p $R
[ -f $R/eval-teacher/metrics.json ] || flg eval model=synth-tiny $EV steps=50 out=$R/eval-teacher || exit 1

student() {  # folder name, stage3 keys...
  local name=$1; shift
  [ -f $R/eval-$name/metrics.json ] && return
  $S3 "$@" out=$R/$name && flg eval model=$R/$name/student $EV out=$R/eval-$name
}
row() {  # retention
  local r=$1 s2 s
  if [ "$r" = 1.0 ]; then
    for s in $FULL_STEPS; do student fig1-r1.0-s$s model=synth-tiny retention=1.0 beta2=0.0 student_steps=$s; done
    return
  fi
  # the 70 % Stage II of scripts/testbed_stage2_diagnosis.sh has the same config: reused
  if [ "$r" = 0.7 ] && [ "$S2_STEPS" = 400 ]; then s2=s2-alpha1-frozen-both; else s2=fig1-s2-r$r-$S2_STEPS; fi
  [ -f $R/stage1-r$r/selection.json ] || flg stage1 model=synth-tiny n=$S1N "sigmas=$SIGMAS" retention=$r threads=1 \
    out=$R/stage1-r$r || return 1
  [ -f $R/$s2/model/flgcore.json ] || flg stage2 model=synth-tiny selection=$R/stage1-r$r/selection.json steps=$S2_STEPS \
    batch_size=16 threads=1 alpha=1.0 target=frozen views=both out=$R/$s2 || return 1
  for s in $STEPS; do student fig1-r$r-s$s-$S2_STEPS model=$R/$s2/model student_steps=$s; done
}
for r in "$@"; do row "$r"; done
[ $# -gt 0 ] && exit 0

.venv/bin/python - "$R" <<'PY'
import sys
from pathlib import Path
import pandas as pd
from flgcore.evaluate import paired_difference, read_clips
R = Path(sys.argv[1])
runs = {d.name[len("eval-fig1-"):]: d for d in sorted(R.glob("eval-fig1-*")) if (d / "clips.csv").is_file()}
if not runs:
    sys.exit(f"no finished student under {R}: run this script with retentions first")
clips = {k: read_clips(d) for k, d in runs.items()}
mean = {k: paired_difference(c, c, n_boot=10).loc["average", "a"] for k, c in clips.items()}  # average over dimensions
best = max(mean, key=mean.get)
rows = []
for k, c in clips.items():
    r, s = float(k.split("-")[0][1:]), int(k.split("-")[1][1:])
    t = paired_difference(c, clips[best]).loc["average"]
    rows.append(dict(run=k, retention=r, steps=s, compute=r * s, average=t["a"], minus_best=t["a - b"],
                     ci95_low=t["ci95_low"], ci95_high=t["ci95_high"]))
table = pd.DataFrame(rows).sort_values(["compute", "retention"])
t = read_clips(R / "eval-teacher") if (R / "eval-teacher" / "clips.csv").is_file() else None
teacher = paired_difference(t, t, n_boot=10).loc["average", "a"] if t is not None else float("nan")
md = [f"teacher (50 Euler steps + CFG): {teacher:.3f}; best student: {best}", "",
      "| retention | steps | compute | average | minus the best | 95 % interval |", "|---|---|---|---|---|---|"]
md += [f"| {t.retention:g} | {t.steps} | {t.compute:g} | {t.average:.3f} | {t.minus_best:+.3f} | "
       f"[{t.ci95_low:+.3f}, {t.ci95_high:+.3f}] |" for t in table.itertuples()]
(R / "fig1.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
PY
