"""Sampling SynthMotion clips from a teacher (Euler + CFG) or a student (few-step), and writing videos.

A model directory holds `transformer/` (diffusers), `text_encoder/` and `flgcore.json`, the sampling
schedule saved with the model (sampler, steps, cfg_scale, shift, and a student's sigmas), so that
nothing about how to sample it has to be remembered elsewhere. Noise is drawn per clip from its
seed, so a clip does not depend on the batch it was sampled in.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from . import flow, synth
from .models import BUILTIN, load_transformer, to_device, velocity_cfg
from .config import FlgError
from .surgery import skipping


@dataclass
class Bundle:
    """A loaded model directory: the transformer, its text encoder and its sampling metadata."""
    model: torch.nn.Module
    encoder: synth.TextEncoder | None  # None for a plain diffusers checkpoint (train it from a latent cache)
    meta: dict
    root: Path


def model_root(name: str | Path) -> Path:
    p = BUILTIN.get(str(name), Path(name))
    if (p / "flgcore.json").is_file():
        return p
    if (p.parent / "flgcore.json").is_file():  # a transformer/ folder inside a model directory
        return p.parent
    raise FlgError(f"{name}: not a flgcore model directory (no flgcore.json beside transformer/ and text_encoder/)")


def scheduler_shift(pipeline_dir: str | Path) -> float:
    """The sigma shift of a diffusers pipeline's flow-matching scheduler (1.0 when there is no scheduler/).

    The key depends on the class: FlowMatch* schedulers (HunyuanVideo: 7) call it `shift`; the UniPC and
    DPM-Solver schedulers that Wan's pipelines ship (`use_flow_sigmas`) call it `flow_shift` (Wan 2.1 480p: 3,
    Wan 2.2 TI2V: 5). Reading only `shift` gave 1.0 for every Wan checkpoint, so Stages II-III trained and
    sampled on the unshifted grid. A resolution-dependent (dynamic) shift or a non-flow scheduler is refused.
    """
    path = Path(pipeline_dir) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return 1.0
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FlgError(f"{path} is not valid JSON: {e}") from None
    name = cfg.get("_class_name", "?")
    if cfg.get("use_dynamic_shifting"):
        raise FlgError(f"{path}: {name} uses a resolution-dependent shift (use_dynamic_shifting), which flgcore does "
                       f"not model (no Wan or HunyuanVideo pipeline uses it)")
    if cfg.get("shift") is not None:
        return float(cfg["shift"])
    if cfg.get("use_flow_sigmas") and cfg.get("flow_shift") is not None:
        return float(cfg["flow_shift"])
    raise FlgError(f"{path}: {name} is not a flow-matching scheduler (no `shift`, nor `flow_shift` with "
                   f"use_flow_sigmas); Wan and HunyuanVideo pipelines ship one")


def load_bundle(name: str | Path, device: str = "cpu") -> Bundle:
    """A flgcore model directory, or a plain diffusers transformer/pipeline directory (no text encoder;
    v-prediction; the shift of its pipeline's scheduler if there is one: `scheduler_shift`)."""
    try:
        root = model_root(name)
    except FlgError:
        from .models import family_of, resolve_model_dir
        try:
            tdir = resolve_model_dir(name)
        except FlgError:
            raise FlgError(f"{name}: not a flgcore model directory (transformer/, text_encoder/, flgcore.json) nor a "
                           f"diffusers transformer or pipeline directory") from None
        model = load_transformer(tdir, device=device)
        model.flg_prediction = "velocity"  # what the raw output means (see models.velocity)
        from .pipelines import pipeline_of
        meta = dict(family=family_of(model).name, kind="diffusers", prediction="velocity",
                    shift=scheduler_shift(tdir.parent))
        if pipeline := pipeline_of(tdir):  # what its stage outputs are sampled with (`flg eval`, pipelines.py)
            meta["pipeline"] = pipeline
        return Bundle(model, None, meta, tdir)
    try:
        meta = json.loads((root / "flgcore.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlgError(f"{root}/flgcore.json is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise FlgError(f"{root}/flgcore.json: expected a mapping of sampling settings, got {type(meta).__name__}")
    model = load_transformer(root / "transformer", device=device)
    model.flg_prediction = meta.get("prediction", "velocity")  # what the raw output means (see models.velocity)
    enc = root / "text_encoder"  # absent for stage outputs of a real checkpoint (its text encoder stays in its pipeline)
    try:
        encoder = synth.TextEncoder.load(enc) if enc.is_dir() else None
    except (OSError, KeyError, json.JSONDecodeError, UnicodeDecodeError, SafetensorError) as e:
        raise FlgError(f"{enc}: not a readable text encoder ({type(e).__name__}: "
                       f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    return Bundle(model, encoder, meta, root)


def require_encoder(bundle: Bundle, name: str | Path) -> Bundle:
    """Refuse a model without a SynthMotion text encoder (a real checkpoint, or a stage output of one) before
    SynthMotion sampling, in one line."""
    if bundle.encoder is None:
        raise FlgError(f"{name} has no SynthMotion text encoder (a real checkpoint or a stage output of one): "
                       f"SynthMotion samples and SynthBench need synth-tiny or a stage output of it; sample a real "
                       f"checkpoint with its diffusers pipeline (README)")
    return bundle


def view_drop(bundle: Bundle, view: str, name) -> list[int]:
    """The blocks a view skips: none for "full", a Stage-II model's saved drop set for "drop"."""
    if view not in ("full", "drop"):
        raise FlgError(f"view must be 'full' or 'drop', got {view!r}")
    if view == "drop" and "drop" not in bundle.meta:
        raise FlgError(f"{name} has no saved drop set (view=drop needs a Stage-II model)")
    return list(bundle.meta["drop"]) if view == "drop" else []


@dataclass
class SampleSpec:
    """How to sample: None fields fall back to the model's saved schedule."""
    sampler: str | None = None        # "euler" (teacher) or "fewstep" (student)
    steps: int | None = None          # Euler steps
    cfg_scale: float | None = None    # CFG scale (1: no CFG)
    shift: float | None = None
    sigmas: list[float] | None = None  # few-step input sigmas
    drop: list[int] = field(default_factory=list)  # blocks to skip (the drop view)

    def resolve(self, meta: dict) -> SampleSpec:
        sampler = self.sampler or meta.get("sampler", "euler")
        if sampler not in ("euler", "fewstep"):
            raise FlgError(f"sampler must be 'euler' or 'fewstep', got {sampler!r}")
        out = SampleSpec(sampler, self.steps or meta.get("steps", 50),
                         self.cfg_scale if self.cfg_scale is not None else meta.get("cfg_scale", 1.0),
                         self.shift if self.shift is not None else meta.get("shift", 1.0),
                         self.sigmas or meta.get("sigmas"), list(self.drop))
        if out.sampler == "fewstep" and not out.sigmas:
            raise FlgError("the fewstep sampler needs sigmas (none given, none saved with the model)")
        if out.steps < 1:
            raise FlgError(f"steps must be >= 1, got {out.steps}")
        return out

    def nfe(self) -> int:
        n = len(self.sigmas) if self.sampler == "fewstep" else self.steps
        return flow.nfe(n, self.cfg_scale)


def clip_noise(seeds, shape) -> torch.Tensor:
    """Initial noise [B, *shape], one generator per clip seeded by the clip's seed."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s) + 7919)) for s in seeds])


def sample_batch(bundle: Bundle, spec: SampleSpec, first_frames: torch.Tensor, captions: list[str],
                 seeds: list[int]) -> torch.Tensor:
    """Sample clips [B, 3, F, H, W] given first frames [B, 3, H, W], captions and per-clip seeds."""
    model, enc = bundle.model, bundle.encoder
    F = bundle.meta.get("frames", synth.FRAMES)
    ref = torch.zeros(len(seeds), 3, F, *first_frames.shape[-2:])
    ref[:, :, 0] = first_frames
    cond = synth.make_cond(enc, ref, captions)
    # frame 0 is generated too (as in Wan 2.1 I2V), so i2v_subject measures how well the model keeps the image
    return _sample(model, spec, cond, synth.null_cond(enc, cond), clip_noise(seeds, ref.shape[1:]), seeds).clamp(-1, 1)


def sample_cached(bundle: Bundle, spec: SampleSpec, cache, index: list[int], seeds: list[int]) -> torch.Tensor:
    """Latents [B, C, F, H, W] sampled from the conditions of `data.LatentCache` items `index` (a real checkpoint:
    the prompts and first frames `flg cache` encoded), one noise seed per clip; decode with `cache.latent_decoder`."""
    x0, cond = cache.items(index)
    return _sample(bundle.model, spec, cond, cache.null_like(cond), clip_noise(seeds, x0.shape[1:]), seeds)


def _sample(model, spec: SampleSpec, cond, null, noise: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    cond, null, noise = to_device(next(model.parameters()).device, cond, null, noise)
    v = lambda x, s: velocity_cfg(model, x, s, cond, null, spec.cfg_scale)
    with torch.no_grad(), skipping(model, spec.drop):
        if spec.sampler == "euler":
            x = flow.euler_sample(v, noise, flow.euler_sigmas(spec.steps, spec.shift))
        else:
            x = flow.fewstep_sample(v, noise, spec.sigmas, generator=torch.Generator().manual_seed(int(seeds[0]) + 104729))
    return x.float().cpu()


def sample_seeds(bundle: Bundle, spec: SampleSpec, seeds: list[int], batch_size: int = 32,
                 progress: bool = True) -> tuple[torch.Tensor, list[synth.ClipSpec]]:
    """Sample one clip per SynthMotion seed, conditioned on its first frame and full caption."""
    out, specs = [], []
    it = range(0, len(seeds), batch_size)
    for i in tqdm(it, desc=f"sample ({spec.sampler}, nfe {spec.nfe()})", disable=not progress, dynamic_ncols=True):
        chunk = seeds[i:i + batch_size]
        real, sp = synth.clips(chunk)
        out.append(sample_batch(bundle, spec, real[:, :, 0], [s.caption for s in sp], chunk))
        specs += sp
    return torch.cat(out), specs


# ----------------------------------------------------------------------------- video files

def to_uint8(clip: torch.Tensor, scale: int = 4) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> [F, H*scale, W*scale, 3] uint8 (nearest upscaling, to be visible)."""
    x = ((clip.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    return x.repeat(scale, axis=1).repeat(scale, axis=2)


def save_video(clip: torch.Tensor, stem: str | Path, fps: int = 4, scale: int = 4) -> list[Path]:
    """Write stem.mp4, stem.gif and stem.png (the frames side by side). Without imageio-ffmpeg (a bare GPU
    image carrying only what a run needs) the mp4 is skipped with a warning, and the gif and png still come."""
    import importlib.util
    import warnings
    from PIL import Image
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    frames = to_uint8(clip, scale)
    mp4, gif, png = (stem.parent / f"{stem.name}.{ext}" for ext in ("mp4", "gif", "png"))  # stems may contain dots
    imgs = [Image.fromarray(f) for f in frames]
    imgs[0].save(gif, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
    Image.fromarray(np.concatenate(list(frames), axis=1)).save(png)
    if importlib.util.find_spec("imageio_ffmpeg") is None:
        warnings.warn("imageio-ffmpeg is not installed: writing gif and png only, no mp4", stacklevel=2)
        return [gif, png]
    import imageio.v2 as imageio
    # frame sizes are multiples of 16, so imageio's macro-block resizing leaves them alone
    imageio.mimwrite(mp4, list(frames), fps=fps, codec="libx264", macro_block_size=1, quality=8)
    return [mp4, gif, png]


def load_image(path: str | Path, size: int = synth.SIZE) -> torch.Tensor:
    """A first frame from an image file -> [3, size, size] in [-1, 1]."""
    from PIL import Image
    try:
        img = Image.open(path).convert("RGB").resize((size, size), Image.NEAREST)
    except (OSError, ValueError) as e:
        raise FlgError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(np.asarray(img, np.float32) / 127.5 - 1).permute(2, 0, 1)
