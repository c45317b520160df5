"""`flg eval`: SynthBench scores for N held-out SynthMotion seeds sampled from a model, or for a folder of clips.

Writes `metrics.json` (aggregate), `clips.csv` (one row per clip) and a few sample videos into the run
folder, and prints the table. The drop view of a Stage-II model is evaluated with `drop=[...]`.
"""
from __future__ import annotations

import json
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
    batch_size: int | None = None  # clips per sampling call; None: 32 SynthMotion clips, 4 videos of a real checkpoint
    clips: str | None = None      # evaluate saved clips (a folder of .npz from `flg sample`) instead
    videos: int = 4               # sample videos written into the run folder
    threads: int = 0
    device: str = "cpu"           # "cuda": sample on a GPU (the analysis stays on the CPU)
    vbench: bool = False          # also write the clips for VBench (<out>/vbench) and score its weight-free
                                  # dimensions ourselves
    # a real checkpoint (a diffusers pipeline folder, or a flgcore model folder made from one): see pipelines.py
    suite: str | None = None      # prompts: a CSV (prompt[,image]), VBench-I2V's info JSON, or cache:<folder>
    suite_images: str | None = None  # VBench-I2V's image folder (default: beside its info JSON)
    base: str | None = None       # the pipeline a flgcore model folder was made from, when it has moved
    n_per_prompt: int = 1         # videos per prompt, seeds seed_offset + 0, 1, ...
    scheduler: str = "euler"      # a teacher's sampler: "euler" (50 steps, the paper's) or "default" (the pipeline's)
    height: int | None = None     # None: the pipeline's defaults
    width: int | None = None
    frames: int | None = None
    precision: str = "auto"       # bf16 on a GPU, fp32 on the CPU
    vae_tiling: bool = False
    vae_slicing: bool = False
    cpu_offload: bool = False
    vbench_python: str | None = None  # the python of a VBench environment: official dimensions, run there
    vbench_dimensions: list[str] | None = None  # None: VBench-I2V's for image-conditioned models, else T2V's


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
    keys = ["prompt_index", "seed"] if "prompt_index" in a and "prompt_index" in b else ["seed"]  # a real suite's
    ka, kb = (set(map(tuple, d[keys].to_numpy().tolist())) for d in (a, b))  # videos pair by prompt and seed
    if ka != kb:
        raise FlgError(f"the two evaluations scored different {' and '.join(keys)}s ({len(a)} and {len(b)} clips, "
                       f"{len(ka & kb)} in common): evaluate both with the same suite, n, n_per_prompt and seed_offset")
    if keys == ["seed"]:
        dims = [d for d in [*synthbench.DIMENSIONS, "average"] if d in a and d in b]
    else:  # every per-video score both have (the weight-free ones, and VBench's where both ran it)
        dims = [d for d in a.columns if d in b and d not in (*keys, "sample") and pd.api.types.is_numeric_dtype(a[d])
                and pd.api.types.is_numeric_dtype(b[d]) and a[d].notna().all() and b[d].notna().all()]
    a, b = (d.set_index(keys).sort_index().loc[:, dims] for d in (a, b))
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
    from .pipelines import is_real
    if not cfg.clips and is_real(cfg.model):
        return run_real_eval(cfg)
    if cfg.suite:
        raise FlgError(f"suite={cfg.suite}: prompt suites are for real checkpoints; {cfg.model} is scored on "
                       f"SynthMotion seeds (n, seed_offset)")
    if cfg.clips:
        clips, specs = load_clip_folder(cfg.clips)
    else:
        bundle = require_encoder(load_bundle(cfg.model, device=cfg.device), cfg.model)
        saved = view_drop(bundle, cfg.view, cfg.model)  # checks the view even when drop=[...] is given
        drop = list(cfg.drop) or saved
        spec = SampleSpec(cfg.sampler, cfg.steps, cfg.cfg, cfg.shift, cfg.sigmas, drop).resolve(bundle.meta)
        t0 = time.time()
        clips, specs = sample_seeds(bundle, spec, synth.heldout_seeds(cfg.n, cfg.seed_offset), cfg.batch_size or 32)
        info = dict(sampler=spec.sampler, steps=spec.steps, cfg_scale=spec.cfg_scale, shift=spec.shift,
                    nfe=spec.nfe(), dropped_blocks=len(spec.drop), sec_per_clip=(time.time() - t0) / len(specs))
    save_config(cfg, out)
    agg, rows = synthbench.evaluate(clips, specs)
    agg.update(info)
    if cfg.vbench:
        from . import vbench
        folder = vbench.export_for_vbench(list(clips), [sp.caption for sp in specs], out / "vbench")
        agg.update({f"vbench_{k}": v for k, v in vbench.own_scores(folder).items() if k != "n"})
    write_json(out / "metrics.json", agg)
    pd.DataFrame(rows).to_csv(out / "clips.csv", index=False)
    for i in range(min(cfg.videos, len(specs))):
        save_video(clips[i], out / "samples" / f"{specs[i].seed}_{specs[i].caption.replace(' ', '_')}")
    print(format_scores(agg))
    return agg



def write_full_info(out: Path, clips: pd.DataFrame, dimensions: list[str]) -> Path:
    """VBench's `vbench_full_info.json`: per prompt, its text, the dimensions to score and its videos' paths."""
    info = [dict(prompt_en=prompt, dimension=list(dimensions), video_list=[str(out / "videos" / v) for v in g.video])
            for prompt, g in clips.groupby("prompt", sort=False)]
    path = out / "vbench_full_info.json"
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path


def run_real_eval(cfg: EvalConfig) -> dict:
    """`flg eval` of a real checkpoint: sample every prompt of the suite `n_per_prompt` times through the family's
    stock pipeline (pipelines.py), write the videos in VBench's layout, score what needs no learned weights
    (vbench.video_scores), and with `vbench_python` add official VBench dimensions computed in that environment."""
    from tqdm.auto import tqdm
    from . import pipelines, suites, vbench
    if not cfg.suite:
        raise FlgError(f"{cfg.model} is a real checkpoint: give suite=<CSV of prompt[,image] | VBench-I2V info JSON | "
                       f"cache:<latent cache folder>>")
    batch = cfg.batch_size or 4
    if cfg.n_per_prompt < 1:
        raise FlgError(f"n_per_prompt must be >= 1, got {cfg.n_per_prompt}")
    spec = pipelines.PipeSpec(cfg.scheduler, cfg.steps, cfg.cfg, cfg.height, cfg.width, cfg.frames, cfg.precision,
                              cfg.vae_tiling, cfg.vae_slicing, cfg.cpu_offload, list(cfg.drop))
    spec.check(cfg.view)
    pipeline, meta = pipelines.resolve(cfg.model, cfg.base)
    if cfg.view == "drop" and (meta is None or "drop" not in meta):
        raise FlgError(f"{cfg.model} has no saved drop set (view=drop needs a Stage-II model)")
    items = suites.read_suite(cfg.suite, pipelines.image_conditioned(pipeline), cfg.suite_images)[:cfg.n]  # before
    loaded = pipelines.load(cfg.model, cfg.base, cfg.view, spec, cfg.device)  # the weights load: bad suites fail fast
    h, w = pipelines.video_size(loaded)
    fps = pipelines.FPS[loaded.family]
    out = Path(cfg.out)
    save_config(cfg, out)
    seeds = [cfg.seed_offset + i for i in range(cfg.n_per_prompt)]
    rows, first, sampling = [], [], 0.0
    bar = tqdm(total=len(items) * len(seeds), desc=f"eval ({loaded.kind}, {loaded.info['steps']} steps)", unit="video",
               dynamic_ncols=True)
    # a batch: seeds of one prompt with its image (I2V), or of several prompts (T2V); in suite order either way
    pairs = [(item, seed) for item in items for seed in seeds]
    batches = ([pairs[k:k + batch] for k in range(0, len(pairs), batch)] if not loaded.image_conditioned
               else [[(item, s) for s in seeds[k:k + batch]] for item in items for k in range(0, len(seeds), batch)])
    image, image_of = None, None
    for chunk in batches:
        item = chunk[0][0]
        if loaded.image_conditioned and image_of != item.index:
            image, image_of = suites.load_image(item, h, w), item.index
            vbench.save_i2v_image(out, item.prompt, image)  # VBench-I2V's custom input: <out>/images/<prompt>.png
        t0 = time.time()
        videos = pipelines.generate(loaded, [it.prompt for it, _ in chunk], [s for _, s in chunk], image)
        sampling += time.time() - t0
        for (item, seed), video in zip(chunk, videos):
            path = pipelines.write_video(video, out / "videos" / f"{item.prompt}-{seed - cfg.seed_offset}.mp4", fps)
            frames = vbench.read_video(path)[0]  # scored as decoded, as VBench scores the files
            ref = np.asarray(image) if image is not None else None
            rows.append(dict(prompt_index=item.index, prompt=item.prompt, image=str(item.image or ""),
                             sample=seed - cfg.seed_offset, seed=seed, video=path.name,
                             **vbench.video_scores(frames, fps, ref)))
            if len(first) < cfg.videos:
                first.append(frames)
            bar.update(1)
    bar.close()
    clips = pd.DataFrame(rows)
    # VBench's custom-input mode scores these (not the six dimensions that need VBench's own prompts)
    dims = cfg.vbench_dimensions or (vbench.I2V_DIMENSIONS if loaded.image_conditioned else
                                     [d for d in vbench.T2V_DIMENSIONS if d not in vbench.NEEDS_VBENCH_PROMPTS])
    write_full_info(out, clips, dims)
    metric_cols = [c for c in vbench.METRIC_DEFINITIONS if c in clips]
    agg = {c: float(clips[c].mean()) for c in metric_cols}
    agg["definitions"] = {c: vbench.METRIC_DEFINITIONS[c] for c in metric_cols}
    if cfg.vbench_python:
        official = vbench.run_vbench(out, cfg.vbench_python, dims, device=cfg.device,
                                     i2v_images=str(out / "images") if loaded.image_conditioned else None)
        _, per_video = vbench.read_vbench_results(out / "vbench_results" / "flgcore_eval_results.json")
        agg["vbench"] = dict(official or {})
        if (score := vbench.fig1_score(agg["vbench"])) is not None:
            agg["vbench"]["fig1_score"] = score
        clips = clips.merge(per_video.set_index("video").add_prefix("vbench_"), left_on="video", right_index=True,
                            how="left")
    agg.update(loaded.info, nfe=pipelines.nfe(loaded), prompts=len(items), n_per_prompt=cfg.n_per_prompt, videos=len(clips),
               sec_per_video=sampling / max(1, len(clips)), videos_per_hour=3600 * len(clips) / max(sampling, 1e-9),
               height=h, width=w, frames=int(first[0].shape[0]) if first else None, fps=fps)
    clips.to_csv(out / "clips.csv", index=False)
    if first:
        pipelines.contact_sheet(first, out / "contact_sheet.png")
    write_json(out / "metrics.json", agg)
    print("\n".join(f"{k:>32}  {agg[k]:.4f}" for k in metric_cols))
    print(f"{len(clips)} videos in {out / 'videos'} (sampled in {agg['sec_per_video']:.2f} s each); "
          f"contact sheet {out / 'contact_sheet.png'}")
    return agg
