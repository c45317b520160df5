"""Stage I (`flg stage1`): score every DiT block by the error its removal causes, then select a keep set.

Eq. 4 (the paper's score): E_i = E ||x_s - s v_skip-i(x_s, s) - x0||^2, the Tweedie x0 error with
block i skipped, over a grid of sigmas, with the SAME (x0, eps, s) draws for every block (common
random numbers), reported with a standard error. Eq. 3 (the objective it approximates): the output
error ||v_full - v_skip-i||^2 against the full model. Besides the paper's one-shot ranking we offer
an iterative greedy selection that re-scores the remaining blocks after each removal.

Cost: skipping block i leaves blocks 0..i-1 unchanged, so one capture pass stores every block's
output and the pass that skips block i starts from block i-1's stored output (a `_Replay` module put
in place of the prefix): N + N(N-1)/2 block evaluations instead of the naive N(N-1).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import flow, synth
from .config import check_values, save_config
from .data import LatentCache
from .models import family_of, to_device, velocity
from .config import FlgError
from .runs import check_precision, setup_torch, write_json
from .surgery import blocks, check_retention, retention_of, select_keep, skipping, swapped_blocks


# ----------------------------------------------------------------------------- the scores (pure)

def eq4_error(x_s: torch.Tensor, s: torch.Tensor, v_skip: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Eq. 4 per sample: mean over elements of (x_s - s v_skip - x0)^2. Shapes [B, C, F, H, W] -> [B]."""
    return (flow.x0_from_velocity(x_s, s, v_skip) - x0).pow(2).flatten(1).mean(1)


def eq3_error(v_skip: torch.Tensor, v_full: torch.Tensor) -> torch.Tensor:
    """Eq. 3 per sample: mean over elements of (y_original - y_pruned)^2 with y the model output. -> [B]."""
    return (v_skip - v_full).pow(2).flatten(1).mean(1)


# ----------------------------------------------------------------------------- skip-one forwards

class _Replay(nn.Module):
    """Stands in for the blocks before a skipped one: returns their stored output, ignoring its inputs."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


@contextmanager
def _block_sequence(model, seq: list):
    """Run the forward over `seq` (block modules and at most one leading _Replay) instead of its blocks."""
    fam = family_of(model)
    group_of = {id(b.module): b.group for b in blocks(model)}
    lists = {g: [] for g, _, _ in fam.groups}
    first = fam.groups[0][0]
    for m in seq:
        lists[group_of.get(id(m), first)].append(m)
    with swapped_blocks(model, {attr: lists[g] for g, attr, _ in fam.groups}):
        yield


def _moved(o, device):
    """A block's output (a tensor or a tuple of them) on `device`; None leaves it where it is."""
    if device is None:
        return o
    return tuple(_moved(t, device) for t in o) if isinstance(o, tuple) else o.to(device, non_blocking=True)


def skip_each(model, x, s, cond, active: list[int] | None = None, reuse: bool = True, store: str | None = None):
    """Velocity with each active block skipped in turn, the other active blocks kept.

    Returns ({block index: v_skip}, v_active) where v_active runs all active blocks. With reuse, one
    capture pass stores each block's output and each skip pass replays the stored prefix. `store="cpu"`
    keeps those outputs in CPU memory: HunyuanVideo-I2V at 720p x 129 frames has 118,800 tokens, so its 60
    block outputs take 44 GB in bf16 beside the 26 GB model (computed, not measured).
    """
    bl = blocks(model)
    active = [b.index for b in bl] if active is None else sorted(active)
    mods = {b.index: b.module for b in bl}
    out = {}
    if not reuse:
        with torch.no_grad():
            full_drop = [b.index for b in bl if b.index not in active]
            with skipping(model, full_drop):
                v_active = velocity(model, x, s, cond)
            for i in active:
                with skipping(model, full_drop + [i]):
                    out[i] = velocity(model, x, s, cond)
        return out, v_active
    stored, hooks = {}, []
    for i in active:
        hooks.append(mods[i].register_forward_hook(
            lambda m, a, o, i=i: stored.__setitem__(i, _moved(o, store))))
    try:
        with torch.no_grad(), _block_sequence(model, [mods[i] for i in active]):
            v_active = velocity(model, x, s, cond)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for k, i in enumerate(active):
            prefix = [_Replay(_moved(stored[active[k - 1]], x.device if store else None))] if k > 0 else []
            with _block_sequence(model, prefix + [mods[j] for j in active[k + 1:]]):
                out[i] = velocity(model, x, s, cond)
    return out, v_active


def capture_blocks(model, x, s, cond, store: str | None = None) -> tuple[dict, torch.Tensor]:
    """The full model's velocity and every block's output ({block index: output}): the prefixes that
    `skip_set_velocity` replays. `store` as in `skip_each`."""
    stored = {}
    hooks = [b.module.register_forward_hook(lambda m, a, o, i=b.index: stored.__setitem__(i, _moved(o, store)))
             for b in blocks(model)]
    try:
        with torch.no_grad():
            v_full = velocity(model, x, s, cond)
    finally:
        for h in hooks:
            h.remove()
    return stored, v_full


def skip_set_velocity(model, x, s, cond, drop: list[int], captured: dict) -> torch.Tensor:
    """Velocity with every block in `drop` skipped at once. The blocks before the first dropped one are the
    full model's: their output is replayed from `captured` (`capture_blocks` on the same inputs), so only the
    kept blocks after it run."""
    mods = {b.index: b.module for b in blocks(model)}
    drop = set(drop)
    first = min(drop, default=len(mods))
    prefix = [_Replay(_moved(captured[first - 1], x.device))] if first > 0 else []
    with torch.no_grad(), _block_sequence(model, prefix + [mods[j] for j in sorted(mods) if j > first and j not in drop]):
        return velocity(model, x, s, cond)


def set_errors(model, batches, drop: list[int], cache: dict | None = None, store: str | None = None) -> pd.DataFrame:
    """Eq. 3 (output error vs the full model) and Eq. 4 (Tweedie x0 error) per sample of skipping the whole set
    `drop`: one row per sample (sigma, eq3, eq4). `cache` (a dict kept between calls) holds each batch's noised
    input, full-model velocity and block outputs, which do not depend on `drop`: a later call runs only the
    kept blocks after the first dropped one."""
    cache = {} if cache is None else cache
    device = next(model.parameters()).device
    rows = []
    for k, batch in enumerate(batches):
        if k not in cache:
            x0, cond, eps, s = to_device(device, *batch)
            x_s = flow.add_noise(x0, eps, s)
            cache[k] = (x0, cond, s, x_s, *capture_blocks(model, x_s, s, cond, store))
        x0, cond, s, x_s, captured, v_full = cache[k]
        v = v_full if not drop else skip_set_velocity(model, x_s, s, cond, drop, captured)
        e3, e4 = eq3_error(v.float(), v_full.float()), eq4_error(x_s.float(), s, v.float(), x0.float())
        rows += [dict(sigma=float(sg), eq3=float(a), eq4=float(b)) for sg, a, b in zip(s.tolist(), e3, e4)]
    return pd.DataFrame(rows)


@contextmanager
def count_block_calls(model):
    """Count block forward calls (a _Replay is not a block and is not counted)."""
    counter = {"n": 0}
    hooks = [b.module.register_forward_pre_hook(lambda *a: counter.__setitem__("n", counter["n"] + 1))
             for b in blocks(model)]
    try:
        yield counter
    finally:
        for h in hooks:
            h.remove()


# ----------------------------------------------------------------------------- the stage

@dataclass
class Stage1Config:
    model: str = "synth-tiny"       # a flgcore model, or a diffusers transformer/pipeline directory
    data: str = "synth"              # "synth" (SynthMotion) or a latent cache folder (see data.py)
    out: str = "runs/stage1"
    n: int = 64                   # clips scored (training distribution)
    batch_size: int = 16
    sigmas: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    retention: float = 0.7        # share of block parameters kept by the selection
    method: str = "oneshot"       # "oneshot" (the paper's ranking) or "iterative" (greedy, re-scored)
    objective: str = "eq4"        # "eq4" (Tweedie x0 error) or "eq3" (output error vs the full model)
    seed: int = 0
    compare_naive: bool = True    # time one batch the naive way too and check the scores agree
    threads: int = 0
    device: str = "cpu"           # "cuda": score on a GPU (the draws stay on the CPU)
    precision: str = "fp32"       # "bf16" for real checkpoints on one GPU (scores are averaged in fp32)
    store_on_cpu: bool = False    # keep the replayed block outputs in CPU memory (large token counts: see skip_each)


def scoring_bundle(model: str, device: str = "cpu", precision: str = "fp32"):
    """The model as Stage I scores it: its weights cast to bf16 for precision="bf16" (a real checkpoint on one
    GPU; `models.velocity` casts the inputs to the weights' dtype)."""
    from .sampling import load_bundle
    check_precision(precision)
    bundle = load_bundle(model, device=device)
    if precision == "bf16":
        bundle.model.to(torch.bfloat16)
    return bundle


def scoring_batches(cfg: Stage1Config, encoder: synth.TextEncoder | None):
    """(x0, cond, eps, s) batches: every block sees the same draws (common random numbers).
    From SynthMotion (data="synth") or the first n clips of a latent cache."""
    rng = np.random.default_rng(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    cache = None if cfg.data == "synth" else LatentCache(cfg.data)
    n = cfg.n if cache is None else min(cfg.n, len(cache))
    if cache is None and encoder is None:
        raise FlgError("data=synth needs a flgcore model with a text encoder; give data=<latent cache folder>")
    for start in range(0, n, cfg.batch_size):
        if cache is not None:
            x0, cond = cache.items(range(start, min(start + cfg.batch_size, n)))
        else:
            x0, specs = synth.clips(synth.train_seeds(rng, min(cfg.batch_size, n - start)))
            cond = synth.make_cond(encoder, x0, [sp.caption for sp in specs])
        for sig in cfg.sigmas:
            yield x0, cond, torch.randn(x0.shape, generator=g), torch.full((len(x0),), float(sig))


def score_blocks(model, batches, objective: str = "eq4", active: list[int] | None = None,
                 drop_ref: list[int] | None = None, progress: bool = True, store: str | None = None) -> pd.DataFrame:
    """Tidy per-sample errors: one row per (block, sigma, sample). Eq. 3 compares with the full model.
    Batches (drawn on the CPU) go to the model's device one at a time: all of a real run's at once would not
    fit (320 x 90 MB for HunyuanVideo-I2V at 720p)."""
    rows = []
    device = next(model.parameters()).device
    for batch in tqdm(list(batches), desc="stage1 scoring", disable=not progress, dynamic_ncols=True):
        x0, cond, eps, s = to_device(device, *batch)
        x_s = flow.add_noise(x0, eps, s)
        v_skip, v_act = skip_each(model, x_s, s, cond, active, store=store)
        if objective == "eq3" and active is not None and len(active) < len(blocks(model)):
            with torch.no_grad():
                v_act = velocity(model, x_s, s, cond)  # Eq. 3 is always against the original model
        for i, v in v_skip.items():
            err = eq4_error(x_s, s, v, x0) if objective == "eq4" else eq3_error(v, v_act)
            rows += [dict(block=i, sigma=float(s[0]), err=float(e)) for e in err]
    return pd.DataFrame(rows)


def summarise(per_sample: pd.DataFrame, model) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(importance per block x sigma, summary per block) with means and standard errors."""
    def agg(df):
        return pd.Series(dict(mean=df.err.mean(), se=df.err.std(ddof=1) / np.sqrt(len(df)) if len(df) > 1 else 0.0,
                              n=len(df)))
    by_t = per_sample.groupby(["block", "sigma"]).apply(agg, include_groups=False).reset_index()
    by_b = per_sample.groupby("block").apply(agg, include_groups=False).reset_index()
    info = pd.DataFrame([dict(block=b.index, group=b.group, params=b.params) for b in blocks(model)])
    by_t = by_t.merge(info, on="block")
    by_b = by_b.merge(info, on="block").rename(columns={"mean": "importance"})
    by_b["rank"] = by_b.importance.rank(ascending=False, method="first").astype(int)
    return by_t, by_b


def _budget(bl, retention: float) -> float:
    return check_retention(retention) * sum(b.params for b in bl) * (1 + 1e-9)  # as select_keep: float rounding


def iterative_path(model, batches, retention: float, objective: str = "eq4", progress: bool = True,
                   store: str | None = None) -> list[int]:
    """Greedy removal order: drop the block whose removal hurts least, re-score the rest, until the budget is met.

    Each choice depends only on the blocks still active, so the order for a lower retention extends the order
    for a higher one: one path serves every retention (see `keep_after`)."""
    batches = list(batches)
    bl = blocks(model)
    budget = _budget(bl, retention)
    active, removed = [b.index for b in bl], []
    while sum(bl[i].params for i in active) > budget and len(active) > 1:
        scores = score_blocks(model, batches, objective, active, progress=False, store=store).groupby("block").err.mean()
        removed.append(int(scores.idxmin()))
        active.remove(removed[-1])
        if progress:
            print(f"  iterative: dropped block {removed[-1]}, {len(active)} left")
    return removed


def keep_after(model, removed: list[int], retention: float) -> list[int]:
    """The blocks left by walking a greedy removal order until the retention budget is met."""
    bl = blocks(model)
    budget = _budget(bl, retention)
    active = [b.index for b in bl]
    for i in removed:
        if sum(bl[j].params for j in active) <= budget or len(active) == 1:
            break
        active.remove(i)
    return active


def iterative_selection(model, batches, retention: float, objective: str = "eq4", progress: bool = True,
                        store: str | None = None) -> list[int]:
    """Greedy selection (re-scored after each removal): the blocks kept at this retention."""
    removed = iterative_path(model, batches, retention, objective, progress, store)  # it stops at this budget
    return [b.index for b in blocks(model) if b.index not in removed]


def plot_importance(summary: pd.DataFrame, path: Path, title: str = "Block importance (Eq. 4)") -> None:
    """The importance curve as PNG and PDF. An explicit Figure (no pyplot): a library call must not change the
    kernel's plotting backend or leave a figure open for a notebook to show."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 3.2))
    ax = fig.subplots()
    for g, d in summary.groupby("group"):
        ax.errorbar(d.block, d.importance, yerr=2 * d.se, marker="o", ms=4, capsize=2, label=g)
    ax.set_xlabel("block index")
    ax.set_ylabel("error with the block skipped")
    ax.set_yscale("log")
    ax.set_title(title)
    if summary.group.nunique() > 1:
        ax.legend()
    fig.tight_layout()
    for ext in ("png", "pdf"):  # no creation date in the PDF: the same runs give the same file
        fig.savefig(path.with_suffix(f".{ext}"), dpi=150, metadata={"CreationDate": None} if ext == "pdf" else None)


def run_stage1(cfg: Stage1Config) -> dict:
    check_values(cfg)
    setup_torch(cfg.threads, cfg.device)
    if cfg.method not in ("oneshot", "iterative"):
        raise FlgError(f"method must be 'oneshot' or 'iterative', got {cfg.method!r}")
    if cfg.objective not in ("eq4", "eq3"):
        raise FlgError(f"objective must be 'eq4' or 'eq3', got {cfg.objective!r}")
    check_retention(cfg.retention)
    if not cfg.sigmas or not all(0 < s <= 1 for s in cfg.sigmas):
        raise FlgError(f"sigmas must be a non-empty list in (0, 1], got {cfg.sigmas}")
    out = Path(cfg.out)
    bundle = scoring_bundle(cfg.model, cfg.device, cfg.precision)
    model = bundle.model
    batches = list(scoring_batches(cfg, bundle.encoder))  # on the CPU; score_blocks moves one at a time
    save_config(cfg, out)  # after the data is read: a bad cache or a model without a text encoder writes nothing
    store = "cpu" if cfg.store_on_cpu else None
    metrics: dict = {}

    if cfg.compare_naive:  # the cost claim, measured on the first batch: same scores, fewer block evaluations
        x0, cond, eps, s = to_device(cfg.device, *batches[0])
        x_s = flow.add_noise(x0, eps, s)
        timing = {}
        for reuse in (False, True):
            with count_block_calls(model) as c:
                t0 = time.perf_counter()
                v, _ = skip_each(model, x_s, s, cond, reuse=reuse, store=store)
                timing[reuse] = (time.perf_counter() - t0, c["n"], v)
        same = all(torch.allclose(timing[True][2][i], timing[False][2][i], rtol=1e-4, atol=1e-5) for i in timing[True][2])
        metrics.update(naive_seconds=timing[False][0], reuse_seconds=timing[True][0],
                       naive_block_evals=timing[False][1], reuse_block_evals=timing[True][1],
                       time_ratio=timing[True][0] / timing[False][0], scores_identical=bool(same))
        print(f"prefix reuse: {timing[True][1]} block evaluations vs {timing[False][1]} naive, "
              f"{timing[True][0]:.2f}s vs {timing[False][0]:.2f}s (x{metrics['time_ratio']:.2f}), identical: {same}")

    t0 = time.perf_counter()
    per_sample = score_blocks(model, batches, cfg.objective, store=store)
    by_t, by_b = summarise(per_sample, model)
    by_t.to_csv(out / "importance.csv", index=False)
    by_b.to_csv(out / "blocks.csv", index=False)
    plot_importance(by_b, out / "importance", f"Block importance ({cfg.objective}), {Path(str(cfg.model)).name}")

    params = [b.params for b in blocks(model)]
    if cfg.method == "oneshot":
        keep = select_keep(by_b.sort_values("block").importance.tolist(), params, cfg.retention)
    else:
        keep = iterative_selection(model, batches, cfg.retention, cfg.objective, store=store)
    drop = [i for i in range(len(params)) if i not in keep]
    selection = dict(kept=keep, dropped=drop, params_kept=int(sum(params[i] for i in keep)),
                     params_total=int(sum(params)), retention_target=cfg.retention,
                     retention=retention_of(model, keep), method=cfg.method, objective=cfg.objective)
    write_json(out / "selection.json", selection)
    metrics.update(scoring_seconds=time.perf_counter() - t0, blocks=len(params), kept=len(keep),
                   retention=selection["retention"], importance_first=float(by_b.importance.iloc[0]),
                   importance_last=float(by_b.importance.iloc[-1]),
                   importance_middle_median=float(by_b.importance.iloc[1:-1].median()))
    write_json(out / "metrics.json", metrics)
    print(by_b[["block", "group", "importance", "se", "rank"]].to_string(index=False))
    print(f"keep {keep} ({selection['retention']:.1%} of block parameters); dropped {drop}")
    return metrics
