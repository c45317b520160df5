"""`flg eval`: SynthBench scores for N held-out SynthMotion seeds sampled from a model, or for a folder of clips.

Writes `metrics.json` (aggregate), `clips.csv` (one row per clip) and a few sample videos into the run
folder, and prints the table. The drop view of a Stage-II model is evaluated with `drop=[...]`.
"""
from __future__ import annotations

import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import synth, synthbench
from .config import check_values, save_config
from .config import FlgError
from .runs import setup_torch, write_json
from .sampling import SampleSpec, load_bundle, require_encoder, sample_seeds, save_video, view_drop


@dataclass
class EvalConfig:
    model: str = "synth-tiny"
    out: str = "runs/eval"
    n: int = 256                  # held-out seeds
    seed_offset: int = 0
    sampler: str | None = None    # None: the model's saved sampler
    steps: int | None = None
    cfg: float | None = None
    shift: float | None = None
    sigmas: list[float] | None = None
    drop: list[int] = field(default_factory=list)
    view: str = "full"            # "drop": skip the blocks a Stage-II model saved as its drop set
    batch_size: int = 32
    clips: str | None = None      # evaluate saved clips (a folder of .npz from `flg sample`) instead
    videos: int = 4               # sample videos written into the run folder
    threads: int = 0
    device: str = "cpu"           # "cuda": sample on a GPU (the analysis stays on the CPU)
    vbench: bool = False          # also write the clips for VBench (<out>/vbench), score its weight-free
                                  # dimensions ourselves, and run official VBench where it is installed


def format_scores(agg: dict) -> str:
    keys = [*synthbench.DIMENSIONS, "average", "frechet_distance"]
    return "\n".join(f"{k:>20}  {agg[k]:.4f}" for k in keys if k in agg)


def read_clips(run: str | Path) -> pd.DataFrame:
    """The per-clip scores of an `flg eval` run folder (or its clips.csv)."""
    path = Path(run) / "clips.csv" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise FlgError(f"{run}: no clips.csv (pass an `flg eval` run folder)")
    try:
        df = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as e:  # pandas' parser and empty-data errors are ValueErrors
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FlgError(f"{path}: not a readable CSV ({why})") from None
    if "seed" not in df.columns:
        raise FlgError(f"{path}: no 'seed' column (not the clips.csv of an `flg eval` run)")
    return df


def paired_difference(a: pd.DataFrame, b: pd.DataFrame, n_boot: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Per dimension: mean of a, mean of b, a - b and its 95% paired-bootstrap interval over the seeds.

    Both models were scored on the same held-out seeds (same first frame, noise and caption), so the
    per-seed differences carry most of the signal: resampling seeds, not clips of each model apart, gives
    a much tighter interval than two independent ones. Every dimension is resampled with the same seeds,
    so `average` keeps its meaning (a mean over dimensions, then over seeds). Set-level metrics (Frechet
    distance) have no per-clip value and are left out."""
    if set(a.seed) != set(b.seed):
        raise FlgError(f"the two evaluations scored different seeds ({len(a)} and {len(b)} clips, "
                       f"{len(set(a.seed) & set(b.seed))} in common): evaluate both with the same n and seed_offset")
    dims = [d for d in [*synthbench.DIMENSIONS, "average"] if d in a and d in b]
    a, b = a.set_index("seed").loc[sorted(a.seed), dims], b.set_index("seed").loc[sorted(a.seed), dims]
    diff = a.to_numpy() - b.to_numpy()
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(n_boot, len(diff)))
    boot = diff[idx].mean(axis=1)  # (n_boot, dims)
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    return pd.DataFrame({"a": a.mean().to_numpy(), "b": b.mean().to_numpy(), "a - b": diff.mean(axis=0),
                         "ci95_low": lo, "ci95_high": hi, "share_a_better": (boot > 0).mean(axis=0)}, index=dims)


def load_clip_folder(folder: str | Path) -> tuple[torch.Tensor, list[synth.ClipSpec]]:
    files = sorted(Path(folder).glob("*.npz"))
    if not files:
        raise FlgError(f"{folder}: no .npz clips found (write them with `flg sample --out {folder}`)")
    clips, specs = [], []
    for f in files:
        try:
            d = np.load(f)
            clips.append(torch.from_numpy(d["clip"]))
            specs.append(synth.clip_spec(int(d["seed"])))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # truncated, or not `flg sample`'s
            raise FlgError(f"{f}: not a clip written by `flg sample` ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return torch.stack(clips), specs


def run_eval(cfg: EvalConfig) -> dict:
    check_values(cfg)
    setup_torch(cfg.threads, cfg.device)
    if cfg.n < 1:
        raise FlgError(f"n must be >= 1, got {cfg.n}")
    out = Path(cfg.out)
    info: dict = {}
    if cfg.clips:
        clips, specs = load_clip_folder(cfg.clips)
    else:
        bundle = require_encoder(load_bundle(cfg.model, device=cfg.device), cfg.model)
        saved = view_drop(bundle, cfg.view, cfg.model)  # checks the view even when drop=[...] is given
        drop = list(cfg.drop) or saved
        spec = SampleSpec(cfg.sampler, cfg.steps, cfg.cfg, cfg.shift, cfg.sigmas, drop).resolve(bundle.meta)
        t0 = time.time()
        clips, specs = sample_seeds(bundle, spec, synth.heldout_seeds(cfg.n, cfg.seed_offset), cfg.batch_size)
        info = dict(sampler=spec.sampler, steps=spec.steps, cfg_scale=spec.cfg_scale, shift=spec.shift,
                    nfe=spec.nfe(), dropped_blocks=len(spec.drop), sec_per_clip=(time.time() - t0) / len(specs))
    save_config(cfg, out)
    agg, rows = synthbench.evaluate(clips, specs)
    agg.update(info)
    if cfg.vbench:
        from . import vbench
        folder = vbench.export_for_vbench(list(clips), [sp.caption for sp in specs], out / "vbench")
        agg.update({f"vbench_{k}": v for k, v in vbench.own_scores(folder).items() if k != "n"})
        official = vbench.run_vbench(folder, device=cfg.device)
        if official:
            agg.update({f"vbench_official_{k}": v[0] for k, v in official.items() if isinstance(v, list) and v})
    write_json(out / "metrics.json", agg)
    pd.DataFrame(rows).to_csv(out / "clips.csv", index=False)
    for i in range(min(cfg.videos, len(specs))):
        save_video(clips[i], out / "samples" / f"{specs[i].seed}_{specs[i].caption.replace(' ', '_')}")
    print(format_scores(agg))
    return agg
