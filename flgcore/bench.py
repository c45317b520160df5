"""`flg bench`: the teacher (Euler + CFG, all blocks) against the student (few steps, no CFG, kept blocks).

Both sample the same clips (same first frames, captions and noise seeds) in one run. Reported per
model: median wall time per clip over `repeats` timed runs (after `warmup` untimed ones), NFE, block
parameters; then the theoretical speed-up (NFE x block parameters, the paper's 50*2 / 4 / 0.7 = 35.7x),
the measured one and their ratio. `time_methods` times any set of models this way (notebook 05's Table 2).
At a real size on a GPU (random-init Wan 2.1 1.3B / 14B), see `gpubench.py` (`flg bench --gpu`).
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
from .config import check_values, save_config
from .config import FlgError
from .runs import write_json
from .sampling import Bundle, SampleSpec, load_bundle, require_encoder, sample_batch, view_drop
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


def block_params(model, drop=()) -> int:
    """Parameters of the blocks a forward pass runs (all but `drop`)."""
    drop = set(drop)
    return sum(b.params for b in blocks(model) if b.index not in drop)


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


def time_real(model: str, view: str, steps: int | None, items: list, n: int, repeats: int, warmup: int,
              device: str, size: dict) -> dict:
    """Time a real checkpoint's stock pipeline (pipelines.py) over the first n prompts of a suite: one call for the
    n prompts (text-to-video) or one per prompt and its image; the prompts are encoded inside the timed call."""
    from . import pipelines, suites  # diffusers' pipelines load only for a real checkpoint
    spec = pipelines.PipeSpec(steps=steps, height=size.get("height"), width=size.get("width"), frames=size.get("frames"))
    loaded = pipelines.load(model, view=view, spec=spec, device=device)
    items = items[:n]
    h, w = pipelines.video_size(loaded)
    calls = ([[(it.prompt, suites.load_image(it, h, w))] for it in items] if loaded.image_conditioned
             else [[(it.prompt, None) for it in items]])
    times = []
    for i in tqdm(range(warmup + repeats), desc=f"bench {loaded.kind} ({loaded.info['steps']} steps)", dynamic_ncols=True):
        t0 = time.perf_counter()
        for call in calls:
            pipelines.generate(loaded, [p for p, _ in call], list(range(len(call))), call[0][1])
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    steps, guidance = loaded.info["steps"], loaded.info["guidance_scale"] or 1.0
    return dict(path=str(model), view=view, sampler=loaded.info["scheduler"], steps=steps, cfg_scale=guidance,
                nfe=pipelines.nfe(loaded), blocks=loaded.info["blocks"],
                block_params=block_params(loaded.pipe.transformer), sec_per_clip=statistics.median(times) / len(items),
                sec_per_clip_min=min(times) / len(items), repeats=repeats)


def time_methods(methods: dict[str, dict], n: int = 16, repeats: int = 5, warmup: int = 1,
                 device: str = "cpu", suite: str | None = None, **size) -> pd.DataFrame:
    """Time several models under the same conditions: one process, the same n clips, `repeats` timed runs
    after `warmup` untimed ones each (Table 2 and Fig. 2 compare times taken this way, never times from runs
    made at different moments or loads).

    `methods` maps a name to `flg eval`'s sampling fields: model (a path or a loaded Bundle), and optionally
    sampler, steps, cfg_scale, view ("drop": skip the blocks a Stage-II model saved). One row per method: NFE,
    blocks run and their parameters, median (and min) seconds per clip, and the speed-up over the first method,
    theoretical (NFE x block parameters, the paper's 50*2 / 4 / 0.7 = 35.7x) and measured, and their ratio."""
    if n < 1 or repeats < 1 or warmup < 0:
        raise FlgError(f"need n >= 1, repeats >= 1, warmup >= 0; got n={n}, repeats={repeats}, warmup={warmup}")
    from . import pipelines, suites
    seeds = synth.heldout_seeds(n)
    rows = []
    for name, m in methods.items():
        if not isinstance(m["model"], Bundle) and pipelines.is_real(m["model"]):  # a real checkpoint: its suite's prompts
            if not suite:
                raise FlgError(f"{name}: {m['model']} is a real checkpoint; time_methods needs suite=<prompts>")
            pipeline, _ = pipelines.resolve(m["model"])
            items = suites.read_suite(suite, pipelines.image_conditioned(pipeline))
            rows.append(dict(method=name, **time_real(m["model"], m.get("view", "full"), m.get("steps"), items, n,
                                                      repeats, warmup, device, size)))
            continue
        b = m["model"] if isinstance(m["model"], Bundle) else require_encoder(load_bundle(m["model"], device=device), m["model"])
        view = m.get("view", "full")
        drop = view_drop(b, view, f"{name} ({b.root})")
        spec = SampleSpec(m.get("sampler"), m.get("steps"), m.get("cfg_scale"), drop=drop).resolve(b.meta)
        times = time_sampling(b, spec, seeds, repeats, warmup)
        rows.append(dict(method=name, path=str(b.root), view=view, sampler=spec.sampler,
                         steps=len(spec.sigmas or []) if spec.sampler == "fewstep" else spec.steps,
                         cfg_scale=spec.cfg_scale, nfe=spec.nfe(), blocks=len(blocks(b.model)) - len(drop),
                         block_params=block_params(b.model, drop), sec_per_clip=statistics.median(times) / n,
                         sec_per_clip_min=min(times) / n, repeats=repeats))
    df = pd.DataFrame(rows).set_index("method")
    cost = df["nfe"] * df["block_params"]
    df["theoretical_speedup"] = cost.iloc[0] / cost
    df["measured_speedup"] = df["sec_per_clip"].iloc[0] / df["sec_per_clip"]
    df["ratio"] = df["measured_speedup"] / df["theoretical_speedup"]
    return df


def run_bench(cfg: BenchConfig) -> dict:
    check_values(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    teacher, student = (require_encoder(load_bundle(m, device=cfg.device), m) for m in (cfg.teacher, cfg.student))
    if student.meta.get("sampler") != "fewstep":
        raise FlgError(f"{cfg.student} is not a few-step student (its saved sampler is {student.meta.get('sampler')!r})")
    df = time_methods({"teacher": dict(model=teacher, sampler="euler", steps=cfg.teacher_steps, cfg_scale=cfg.teacher_cfg),
                       "student": dict(model=student)}, cfg.n, cfg.repeats, cfg.warmup, cfg.device)
    s = df.loc["student"]
    summary = dict(theoretical_speedup=float(s["theoretical_speedup"]), measured_speedup=float(s["measured_speedup"]),
                   ratio=float(s["ratio"]),
                   device=torch.cuda.get_device_name() if cfg.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
                   n=cfg.n)
    rows = df.drop(columns=["theoretical_speedup", "measured_speedup", "ratio"]).reset_index(names="model")
    t, s = rows.to_dict("records")
    out = Path(cfg.out)
    save_config(cfg, out)
    rows.to_csv(out / "bench.csv", index=False)
    write_json(out / "metrics.json", dict(summary, teacher=t, student=s))
    print(format_bench([t, s], summary))
    return dict(summary, teacher=t, student=s)


def format_bench(rows: list[dict], summary: dict) -> str:
    lines = [f"{'':>8} {'sampler':>8} {'NFE':>5} {'blocks':>6} {'block params':>13} {'s/clip':>9}"]
    for r in rows:
        lines.append(f"{r['model']:>8} {r['sampler']:>8} {r['nfe']:>5} {r['blocks']:>6} {r['block_params']:>13,} "
                     f"{r['sec_per_clip']:>9.4f}")
    lines.append(f"speed-up: theoretical {summary['theoretical_speedup']:.1f}x (NFE x block params), measured "
                 f"{summary['measured_speedup']:.1f}x, ratio {summary['ratio']:.2f}  [{summary['device']}]")
    return "\n".join(lines)
