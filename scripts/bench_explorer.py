"""Time the layer-importance explorer's update on the shipped teacher: a click on a block toggle -> the skip
set's Eq. 3 error (with prefix reuse), the importance bars and the clip strip redrawn.

    .venv/bin/python scripts/bench_explorer.py --threads 2

Each click toggles one block (from notebook 01's skip set [6, 7, 8], never back to a set already seen), so every
update is cold: the new set's error and its skip-view clips are computed, not read from the explorer's caches.
Prints each click's wall seconds (error / clips / drawing) and CPU seconds (CPU / wall near the thread count: the
cores were ours; far below it: other processes had them), and the median and maximum; then one warm update (a set
seen before). The defaults are notebook 01's explorer at the quick profile (8 clips at 2 sigmas, 2 clips of 10
Euler steps with the teacher's CFG). The debounce (0.3 s of quiet before an update) is not included.
"""
import argparse
import os
import statistics
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="synth-tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--sigmas", default="0.3,0.7")
    ap.add_argument("--clip-seeds", type=int, default=2)
    ap.add_argument("--clip-steps", type=int, default=10)
    ap.add_argument("--clicks", type=int, default=8)
    ap.add_argument("--stage1", default=None, help="a Stage-I run folder (default: score the blocks on the draws)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from flgcore.explorer import explorer
    t0 = time.perf_counter()
    ex = explorer(a.model, stage1=a.stage1, n=a.n, sigmas=[float(s) for s in a.sigmas.split(",")], skip=[6, 7, 8],
                  clip_seeds=[2000000000 + i for i in range(a.clip_seeds)], clip_steps=a.clip_steps, debounce=0)
    print(f"start-up {time.perf_counter() - t0:.1f} s ({len(ex.blocks)} blocks, {sum(len(b[0]) for b in ex.batches)} "
          f"samples for the error, {a.clip_seeds} clips x {a.clip_steps} steps); torch threads {torch.get_num_threads()}, "
          f"load average before the clicks {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    rng, seen, totals, cpu = np.random.default_rng(0), {tuple(ex.skip)}, [], []
    for k in range(a.clicks):
        while True:
            i = int(rng.integers(len(ex.blocks)))
            drop = sorted(set(ex.skip) ^ {i})
            if tuple(drop) not in seen and len(drop) < len(ex.blocks):
                break
        seen.add(tuple(drop))
        c0, t0 = time.process_time(), time.perf_counter()
        ex.errors(drop)
        t1 = time.perf_counter()
        ex.clips(drop)
        t2 = time.perf_counter()
        ex._filling = True  # set the toggle without its own update; update() below is the click's
        ex.toggles[i].value = not ex.toggles[i].value
        ex._filling = False
        r = ex.update()
        t3 = time.perf_counter()
        totals.append(t3 - t0)
        cpu.append(time.process_time() - c0)
        print(f"click {k + 1}: toggle {i:2d} -> skip {drop}: {t3 - t0:.2f} s (error {t1 - t0:.2f}, clips {t2 - t1:.2f}, "
              f"drawing {t3 - t2:.2f}), {cpu[-1]:.2f} CPU s (CPU / wall {cpu[-1] / (t3 - t0):.1f}); Eq. 3 error {r['eq3']:.4g}")
    ex.toggles[i].value = not ex.toggles[i].value  # back to a set seen before: from the caches
    print(f"cold update: median {statistics.median(totals):.2f} s, max {max(totals):.2f} s over {len(totals)} clicks "
          f"(CPU time of all threads: median {statistics.median(cpu):.2f} s); warm update {ex.last_update_s:.2f} s; "
          f"load average after {os.getloadavg()[0]:.2f} (above {os.cpu_count()}: other processes shared the cores)")


if __name__ == "__main__":
    main()
