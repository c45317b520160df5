"""Notebook 01's block-importance analysis: the Stage-I tables, the Eq. 3 error of a skip set, one-shot against
iterative selection per retention, and clips of a skip set beside the teacher's (also reached as `report.*`)."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from . import flow, synth
from .models import fingerprint
from .config import FlgError
from .runs import read_json, write_json


def importance_tables(stage1_run: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    run_dir = Path(stage1_run)
    return pd.read_csv(run_dir / "blocks.csv"), pd.read_csv(run_dir / "importance.csv")


def scoring_batches_for(bundle, n: int, sigmas: list[float], seed: int, batch_size: int = 16, data: str = "synth"):
    """Stage I's draws, on the CPU (they go to the model one batch at a time)."""
    from .importance import Stage1Config, scoring_batches
    return list(scoring_batches(Stage1Config(n=n, sigmas=list(sigmas), seed=seed, batch_size=batch_size, data=data),
                                bundle.encoder))


@torch.no_grad()
def set_error(model, batches, drop: list[int]) -> float:
    """Eq. 3 for a whole set: mean squared output error of the view without `drop` against the full model."""
    from .importance import eq3_error
    from .models import to_device, velocity
    from .surgery import skipping
    errs = []
    device = next(model.parameters()).device
    for batch in batches:
        x0, cond, eps, s = to_device(device, *batch)
        x_s = flow.add_noise(x0, eps, s)
        v_full = velocity(model, x_s, s, cond)
        with skipping(model, drop):
            errs.append(eq3_error(velocity(model, x_s, s, cond), v_full))
    return float(torch.cat(errs).mean())


def selection_comparison(bundle, by_block: pd.DataFrame, retentions: list[float], n: int, sigmas: list[float],
                         seed: int = 1, csv: str | Path | None = None, data: str = "synth",
                         batch_size: int = 16) -> pd.DataFrame:
    """One-shot ranking vs iterative greedy: the Eq. 3 error of each keep set on fresh draws (seed != Stage I's;
    from a latent cache, the same first n clips with fresh noise). With `csv`, the table is written there (its
    parameters beside it) and reused when they match."""
    params = dict(retentions=list(retentions), n=n, sigmas=list(sigmas), seed=seed, model=fingerprint(bundle.root),
                  importance=by_block.sort_values("block").importance.round(10).tolist())
    if data != "synth":
        params.update(data=str(Path(data).resolve()), batch_size=batch_size)
    if (dtype := next(bundle.model.parameters()).dtype) != torch.float32:
        params.update(dtype=str(dtype))
    sidecar = Path(csv).with_suffix(".json") if csv else None
    if sidecar is not None and sidecar.is_file() and Path(csv).is_file() and read_json(sidecar) == params:
        return pd.read_csv(csv)
    table = _selection_comparison(bundle, by_block, retentions, n, sigmas, seed, data, batch_size)
    if csv:
        tmp = Path(csv).with_suffix(".tmp")
        table.to_csv(tmp, index=False)
        tmp.replace(csv)
        write_json(sidecar, params)
    return table


def _selection_comparison(bundle, by_block, retentions, n, sigmas, seed, data="synth", batch_size=16) -> pd.DataFrame:
    from .importance import iterative_path, keep_after
    from .surgery import blocks, complement, select_keep
    model = bundle.model
    params = [b.params for b in blocks(model)]
    pick = scoring_batches_for(bundle, n, sigmas, seed=0, batch_size=batch_size, data=data)
    held = scoring_batches_for(bundle, n, sigmas, seed=seed, batch_size=batch_size, data=data)
    path = iterative_path(model, pick, min(retentions), "eq3", progress=False)  # one greedy path serves all
    rows = []
    for r in retentions:
        keeps = dict(oneshot=select_keep(by_block.sort_values("block").importance.tolist(), params, r),
                     iterative=keep_after(model, path, r))
        for method, keep in keeps.items():
            rows.append(dict(retention=r, method=method, kept=len(keep), keep=keep,
                             eq3_error=set_error(model, held, complement(model, keep))))
    return pd.DataFrame(rows)


def skip_explorer(bundle, skip: list[int], seeds: list[int], steps: int = 25, n_err: int = 16,
                  sigmas: tuple[float, ...] = (0.3, 0.7), data: str = "synth", cfg_scale: float | None = None,
                  batch_size: int = 16, frames: int = 8):
    """Skip these blocks: their Eq. 3 error, and clips of the full model beside the skip view (one figure;
    `frames` evenly spaced frames of each clip). On the testbed the clips are SynthMotion seeds; on a real
    checkpoint (`data` a latent cache) they are the cache's first clips, re-generated from their prompts and
    first frames with one noise seed each, and decoded with the pipeline's VAE (`cfg_scale`: e.g. 5 for Wan)."""
    from .sampling import SampleSpec, sample_cached, sample_seeds, to_uint8
    err = set_error(bundle.model, scoring_batches_for(bundle, n_err, list(sigmas), seed=2, batch_size=batch_size,
                                                      data=data), list(skip))
    spec = lambda drop: SampleSpec("euler", steps, cfg_scale, None, None, drop).resolve(bundle.meta)
    if data == "synth":
        views = {name: sample_seeds(bundle, spec(drop), list(seeds), progress=False)[0]
                 for name, drop in (("full", []), (f"skip {list(skip)}", list(skip)))}
        real = synth.clips(list(seeds))[0]
    else:
        from .cache import latent_decoder
        from .data import LatentCache
        cache, index = LatentCache(data), list(range(len(seeds)))
        if len(seeds) > len(cache):
            raise FlgError(f"clip_seeds: {len(seeds)} clips asked for, the cache {data} holds {len(cache)}")
        decode = latent_decoder(bundle.root.parent, device=str(next(bundle.model.parameters()).device))
        real = decode(cache.items(index)[0])
        views = {name: decode(sample_cached(bundle, spec(drop), cache, index, list(seeds)))
                 for name, drop in (("full", []), (f"skip {list(skip)}", list(skip)))}
    rows = [("real", real), *views.items()]
    shown = np.unique(np.linspace(0, real.shape[2] - 1, min(frames, real.shape[2])).round().astype(int))
    fig, axes = plt.subplots(len(rows), len(seeds), figsize=(3.2 * len(seeds), 1.0 * len(rows) + 0.6), squeeze=False)
    for i, (name, clips) in enumerate(rows):
        for j in range(len(seeds)):
            axes[i, j].imshow(np.concatenate(list(to_uint8(clips[j][:, shown], 1)), axis=1))
            axes[i, j].set_xticks([]); axes[i, j].set_yticks([])
            if j == 0:
                axes[i, j].set_ylabel(name, rotation=0, ha="right", va="center")
    fig.suptitle(f"Eq. 3 error of skipping {list(skip)}: {err:.4f}")
    return err, fig
