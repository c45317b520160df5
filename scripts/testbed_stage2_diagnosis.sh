#!/bin/bash
# Why Stage II at alpha = 1 collapses on the testbed, and what trains the deployed (drop) view: one Stage II per
# variant (400 steps, batch 16, lr 2e-4, p 0.5, whole_set, Stage I's one-shot 70 % keep set, unless the variant says
# otherwise), each drop view scored on the validation seeds 1000-1063 (n = 64, 50 Euler steps + CFG 4), then every
# variant against `target: frozen` at alpha 1 with 95 % paired-bootstrap intervals (runs/stage2-diagnosis/table.md).
# One CPU thread, ~15 min per variant on an idle core; finished variants are skipped, a killed one resumes.
#
#   bash scripts/testbed_stage2_diagnosis.sh            # R=<folder> to run elsewhere
set -u
cd "$(dirname "$0")/.."
flg() { nice -n 19 .venv/bin/flg "$@"; }
export OMP_NUM_THREADS=1
R=${R:-runs/stage2-diagnosis}
SIGMAS="[0.1, 0.3, 0.5, 0.7, 0.9]"
EV="view=drop n=64 seed_offset=1000 steps=50 threads=1"
[ -f $R/stage1/selection.json ] || flg stage1 model=synth-tiny n=64 "sigmas=$SIGMAS" retention=0.7 threads=1 out=$R/stage1
[ -f $R/stage1-iterative/selection.json ] || flg stage1 model=synth-tiny n=64 "sigmas=$SIGMAS" retention=0.7 \
  method=iterative threads=1 out=$R/stage1-iterative
variant() {  # name, stage2 keys...
  local name=$1; shift
  [ -f $R/eval-$name/metrics.json ] && return
  flg stage2 model=synth-tiny selection=$R/stage1/selection.json steps=400 batch_size=16 threads=1 "$@" \
    out=$R/s2-$name && flg eval model=$R/s2-$name/model $EV out=$R/eval-$name
}
drop=$(python3 -c "import json; print(json.load(open('$R/stage1/selection.json'))['dropped'])")
[ -f $R/eval-pruned-untrained/metrics.json ] || flg eval model=synth-tiny "drop=$drop" n=64 seed_offset=1000 \
  steps=50 threads=1 out=$R/eval-pruned-untrained
variant alpha1-frozen alpha=1.0 target=frozen
variant alpha1-shared alpha=1.0 target=shared
variant alpha0.5-frozen alpha=0.5 target=frozen
variant alpha1-frozen-p1 alpha=1.0 target=frozen p=1.0
variant alpha1-frozen-both alpha=1.0 target=frozen views=both
variant alpha1-frozen-iterative alpha=1.0 target=frozen selection=$R/stage1-iterative/selection.json
variant alpha1-frozen-lr5e-5 alpha=1.0 target=frozen lr=5e-5
variant alpha0.5-shared alpha=0.5 target=shared
variant alpha0-shared alpha=0.0 target=shared
variant alpha1-frozen-lr2e-5 alpha=1.0 target=frozen lr=2e-5
variant alpha1-frozen-lr6e-4 alpha=1.0 target=frozen lr=6e-4
variant alpha1-frozen-both-2000 alpha=1.0 target=frozen views=both steps=2000
variant alpha1-frozen-2000 alpha=1.0 target=frozen steps=2000
variant alpha1-frozen-4000 alpha=1.0 target=frozen steps=4000
.venv/bin/python - "$R" <<'EOF'
import sys
from pathlib import Path
import pandas as pd
from flgcore.evaluate import paired_difference, read_clips
R = Path(sys.argv[1])
base = read_clips(R / "eval-alpha1-frozen")
rows = {}
for d in sorted(R.glob("eval-*")):
    if (d / "clips.csv").is_file():
        t = paired_difference(read_clips(d), base, n_boot=10_000).loc["average"]
        rows[d.name[len("eval-"):]] = dict(average=t["a"], minus_alpha1_frozen=t["a - b"], ci95_low=t["ci95_low"],
                                           ci95_high=t["ci95_high"])
table = pd.DataFrame(rows).T.sort_values("average", ascending=False).round(3)
md = ["| variant | " + " | ".join(table.columns) + " |", "|---" * (len(table.columns) + 1) + "|"]
md += [f"| {k} | " + " | ".join(f"{v:+.3f}" if c != "average" else f"{v:.3f}" for c, v in r.items()) + " |"
       for k, r in table.iterrows()]
(R / "table.md").write_text("\n".join(md) + "\n")
print(table.to_string())
EOF
