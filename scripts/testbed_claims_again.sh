#!/bin/bash
# Tables 1 and 9 again with the best Stage II found (`views: both`, `target: frozen`, alpha 1; made by
# scripts/testbed_stage2_diagnosis.sh into the same folder): its 70 % / 4-step student by configs/stage3_synth_tiny.yaml
# with the unpruned (the recipe) and the pruned teacher (Table 9), each scored on the validation seeds 1000-1063
# beside the teacher (50 Euler steps + CFG), paired, with 95 % bootstrap intervals (<R>/claims.md).
# One CPU thread, ~20 min per Stage III; finished steps are skipped, a killed one resumes.
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
[ -f $R/eval-teacher/metrics.json ] || flg eval model=synth-tiny $EV steps=50 out=$R/eval-teacher
for t in unpruned pruned; do
  [ -f $R/eval-s3-both-$t/metrics.json ] && continue
  flg stage3 --config configs/stage3_synth_tiny.yaml model=$S2 teacher=$t threads=1 out=$R/s3-both-$t &&
    flg eval model=$R/s3-both-$t/student $EV out=$R/eval-s3-both-$t
done
.venv/bin/python - "$R" <<'PY'
import sys
from pathlib import Path
from flgcore.evaluate import paired_difference, read_clips
R = Path(sys.argv[1])
pairs = {"student (unpruned teacher) - teacher": ("eval-s3-both-unpruned", "eval-teacher"),
         "student (pruned teacher) - teacher": ("eval-s3-both-pruned", "eval-teacher"),
         "pruned - unpruned teacher (Table 9)": ("eval-s3-both-pruned", "eval-s3-both-unpruned"),
         "student (unpruned teacher) - its Stage II drop view": ("eval-s3-both-unpruned", "eval-alpha1-frozen-both")}
lines = ["| comparison | a | b | a - b | 95 % interval |", "|---|---|---|---|---|"]
for name, (a, b) in pairs.items():
    if (R / a / "clips.csv").is_file() and (R / b / "clips.csv").is_file():
        t = paired_difference(read_clips(R / a), read_clips(R / b)).loc["average"]
        lines.append(f"| {name} | {t['a']:.3f} | {t['b']:.3f} | {t['a - b']:+.3f} | [{t.ci95_low:+.3f}, {t.ci95_high:+.3f}] |")
(R / "claims.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
