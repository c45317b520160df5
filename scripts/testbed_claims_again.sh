#!/bin/bash
# Tables 1, 2 and 9 again with the best Stage II found (`views: both`, `target: frozen`, alpha 1; made by
# scripts/testbed_stage2_diagnosis.sh into the same folder, 400 and 2000 steps): the 70 % / 4-step student by
# configs/stage3_synth_tiny.yaml with the unpruned teacher (the recipe), with the pruned one (Table 9), and DMD2 (the
# same Stage III from the same model with every block kept and beta2 0, as notebook 05 makes it: Table 2), each scored
# on the validation seeds 1000-1063 beside the teacher (50 Euler steps + CFG), paired, with 95 % bootstrap intervals
# (<R>/claims.md). One CPU thread, ~20 min per Stage III; finished steps are skipped, a killed one resumes.
#
#   bash scripts/testbed_stage2_diagnosis.sh && bash scripts/testbed_claims_again.sh   # R=<folder> for both
set -u
cd "$(dirname "$0")/.."
flg() { nice -n 19 .venv/bin/flg "$@"; }
export OMP_NUM_THREADS=1
R=${R:-runs/stage2-diagnosis}
S2=$R/s2-alpha1-frozen-both/model
[ -d $S2 ] || { echo "no $S2: run scripts/testbed_stage2_diagnosis.sh first (R=$R)"; exit 1; }
EV="n=64 seed_offset=1000 threads=1"
S3="flg stage3 --config configs/stage3_synth_tiny.yaml threads=1"
[ -f $R/eval-teacher/metrics.json ] || flg eval model=synth-tiny $EV steps=50 out=$R/eval-teacher
student() {  # name, stage3 keys...
  local name=$1; shift
  [ -f $R/eval-$name/metrics.json ] && return
  $S3 "$@" out=$R/$name && flg eval model=$R/$name/student $EV out=$R/eval-$name
}
student s3-both-unpruned model=$S2 teacher=unpruned
student s3-both-dmd2 model=$S2 teacher=unpruned retention=1.0 beta2=0.0
student s3-both-pruned model=$S2 teacher=pruned
[ -d $R/s2-alpha1-frozen-both-2000/model ] && student s3-both-2000-unpruned model=$R/s2-alpha1-frozen-both-2000/model \
  teacher=unpruned
.venv/bin/python - "$R" <<'PY'
import sys
from pathlib import Path
from flgcore.evaluate import paired_difference, read_clips
R = Path(sys.argv[1])
pairs = {"student (unpruned teacher) - teacher (Table 1)": ("eval-s3-both-unpruned", "eval-teacher"),
         "student (pruned teacher) - teacher": ("eval-s3-both-pruned", "eval-teacher"),
         "pruned - unpruned teacher (Table 9)": ("eval-s3-both-pruned", "eval-s3-both-unpruned"),
         "student (unpruned teacher) - its Stage II drop view": ("eval-s3-both-unpruned", "eval-alpha1-frozen-both"),
         "DMD2 (steps only) - teacher (Table 2)": ("eval-s3-both-dmd2", "eval-teacher"),
         "FastLightGen - DMD2 (Table 2)": ("eval-s3-both-unpruned", "eval-s3-both-dmd2"),
         "pruning only (drop view, 50 steps + CFG) - teacher (Table 2)": ("eval-alpha1-frozen-both", "eval-teacher"),
         "2000-step Stage II: drop view - 400-step drop view": ("eval-alpha1-frozen-both-2000", "eval-alpha1-frozen-both"),
         "2000-step Stage II: student - teacher (Table 1)": ("eval-s3-both-2000-unpruned", "eval-teacher"),
         "2000-step Stage II: student - 400-step student": ("eval-s3-both-2000-unpruned", "eval-s3-both-unpruned"),
         "2000-step Stage II: student - DMD2 (Table 2)": ("eval-s3-both-2000-unpruned", "eval-s3-both-dmd2")}
lines = ["| comparison | a | b | a - b | 95 % interval |", "|---|---|---|---|---|"]
for name, (a, b) in pairs.items():
    if (R / a / "clips.csv").is_file() and (R / b / "clips.csv").is_file():
        t = paired_difference(read_clips(R / a), read_clips(R / b)).loc["average"]
        lines.append(f"| {name} | {t['a']:.3f} | {t['b']:.3f} | {t['a - b']:+.3f} | [{t.ci95_low:+.3f}, {t.ci95_high:+.3f}] |")
(R / "claims.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
