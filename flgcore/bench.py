"""`flg bench`: the teacher (Euler + CFG, all blocks) against the student (few steps, no CFG, kept blocks).

Both sample the same clips (same first frames, captions and noise seeds) in one run. Reported per
model: median wall time per clip over `repeats` timed runs (after `warmup` untimed ones), NFE, block
parameters; then the theoretical speed-up (NFE x block parameters, the paper's 50*2 / 4 / 0.7 = 35.7x),
the measured one and their ratio. At a real size on a GPU (random-init Wan 2.1 1.3B / 14B), see `gpubench.py`
(`flg bench --gpu`).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import synth
from .config import save_config
from .models import FlgError
from .runs import write_json
from .sampling import SampleSpec, load_bundle, require_encoder, sample_batch
from .surgery import blocks


@dataclass
class BenchConfig:
    teacher: str = "synth-tiny"
    student: str = "runs/stage3/student"
    out: str = "runs/bench"
    n: int = 16                   # clips per timed run (one batch)
    repeats: int = 5
    warmup: int = 1
    teacher_steps: int | None = None  # None: the teacher's saved schedule (50 Euler steps, CFG)
    teacher_cfg: float | None = None
    threads: int = 0
    device: str = "cpu"           # "cuda": time on a GPU (sampling ends with a copy to the CPU, which syncs)


def block_params(model) -> int:
    return sum(b.params for b in blocks(model))


def time_sampling(bundle, spec: SampleSpec, seeds: list[int], repeats: int, warmup: int) -> list[float]:
    """Wall seconds of each timed run of `sample_batch` over the same seeds."""
    real, specs = synth.clips(seeds)
    first, captions = real[:, :, 0], [s.caption for s in specs]
    times = []
    for i in tqdm(range(warmup + repeats), desc=f"bench {spec.sampler} (nfe {spec.nfe()})", dynamic_ncols=True):
        t0 = time.perf_counter()
        sample_batch(bundle, spec, first, captions, seeds)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def run_bench(cfg: BenchConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.n < 1 or cfg.repeats < 1 or cfg.warmup < 0:
        raise FlgError(f"need n >= 1, repeats >= 1, warmup >= 0; got n={cfg.n}, repeats={cfg.repeats}, warmup={cfg.warmup}")
    teacher, student = (require_encoder(load_bundle(m, device=cfg.device), m) for m in (cfg.teacher, cfg.student))
    if student.meta.get("sampler") != "fewstep":
        raise FlgError(f"{cfg.student} is not a few-step student (its saved sampler is {student.meta.get('sampler')!r})")
    seeds = synth.heldout_seeds(cfg.n)
    rows = []
    for name, b, spec in [
        ("teacher", teacher, SampleSpec("euler", cfg.teacher_steps, cfg.teacher_cfg).resolve(teacher.meta)),
        ("student", student, SampleSpec().resolve(student.meta)),
    ]:
        times = time_sampling(b, spec, seeds, cfg.repeats, cfg.warmup)
        rows.append(dict(model=name, path=str(b.root), sampler=spec.sampler, steps=len(spec.sigmas or []) or spec.steps,
                         cfg_scale=spec.cfg_scale, nfe=spec.nfe(), blocks=len(blocks(b.model)),
                         block_params=block_params(b.model), sec_per_clip=statistics.median(times) / cfg.n,
                         sec_per_clip_min=min(times) / cfg.n, repeats=cfg.repeats))
    t, s = rows
    theoretical = (t["nfe"] * t["block_params"]) / (s["nfe"] * s["block_params"])
    measured = t["sec_per_clip"] / s["sec_per_clip"]
    summary = dict(theoretical_speedup=theoretical, measured_speedup=measured, ratio=measured / theoretical,
                   device=torch.cuda.get_device_name() if cfg.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
                   n=cfg.n)
    out = Path(cfg.out)
    save_config(cfg, out)
    pd.DataFrame(rows).to_csv(out / "bench.csv", index=False)
    write_json(out / "metrics.json", dict(summary, teacher=t, student=s))
    print(format_bench(rows, summary))
    return dict(summary, teacher=t, student=s)


def format_bench(rows: list[dict], summary: dict) -> str:
    lines = [f"{'':>8} {'sampler':>8} {'NFE':>5} {'blocks':>6} {'block params':>13} {'s/clip':>9}"]
    for r in rows:
        lines.append(f"{r['model']:>8} {r['sampler']:>8} {r['nfe']:>5} {r['blocks']:>6} {r['block_params']:>13,} "
                     f"{r['sec_per_clip']:>9.4f}")
    lines.append(f"speed-up: theoretical {summary['theoretical_speedup']:.1f}x (NFE x block params), measured "
                 f"{summary['measured_speedup']:.1f}x, ratio {summary['ratio']:.2f}  [{summary['device']}]")
    return "\n".join(lines)
