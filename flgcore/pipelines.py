"""Sampling real checkpoints through the family's stock diffusers pipeline (Wan 2.1/2.2, HunyuanVideo; T2V and I2V).

A model is one of:
- a diffusers pipeline folder: the teacher, sampled as the paper does (50 Euler steps with the pipeline's CFG);
  `scheduler: default` keeps the pipeline's own sampler instead;
- a flgcore model folder made from one (`flg prune`, Stage II, Stage III): its transformer replaces the
  pipeline's, everything else (text and image encoders, VAE) comes from the pipeline it was made from, which its
  flgcore.json records (`base=` when that folder has moved). A Stage-II model samples its full or its drop view
  (the drop set pruned away physically); a Stage-III student its own scheduler and steps, without CFG.

A video is a pure function of (model, prompt, image, seed): its initial noise comes from a generator of its own
seed, and a student's re-noising draws from a second generator of its own (`RENOISE_OFFSET`), so neither the batch
it was sampled in nor the order of the suite changes it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import FlgError

RENOISE_OFFSET = 104729  # a student's re-noising generator: seed + this (the initial noise takes the seed itself)
FPS = {"wan": 16, "hunyuan": 24}
PIPELINES = ("WanPipeline", "WanImageToVideoPipeline", "HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline")


@dataclass
class PipeSpec:
    """How to sample: None fields fall back to the pipeline's defaults (teacher) or the student's own."""
    scheduler: str = "euler"           # a teacher's sampler: "euler" (the paper's) or "default" (the pipeline's)
    steps: int | None = None           # None: 50 for a teacher, the student's own count
    guidance_scale: float | None = None  # None: the pipeline's default for a teacher; 1 (no CFG) for a student
    height: int | None = None          # None: the pipeline's default (Wan 480 x 832 x 81, HunyuanVideo 720 x 1280 x 129)
    width: int | None = None
    frames: int | None = None
    precision: str = "auto"            # "bf16", "fp32", or "auto": bf16 on a GPU, fp32 on the CPU
    vae_tiling: bool = False
    vae_slicing: bool = False
    cpu_offload: bool = False          # diffusers' model CPU offload (a GPU with less memory than the pipeline)
    drop: list[int] = field(default_factory=list)  # blocks pruned away before sampling (an untrained skip view)

    def check(self, view: str = "full") -> None:
        if self.scheduler not in ("euler", "default"):
            raise FlgError(f"scheduler must be 'euler' or 'default', got {self.scheduler!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise FlgError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if view not in ("full", "drop"):
            raise FlgError(f"view must be 'full' or 'drop', got {view!r}")


def is_pipeline(path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def is_real(model) -> bool:
    """A diffusers pipeline folder, or a flgcore model folder made from one (no SynthMotion text encoder)."""
    p = Path(str(model))
    return is_pipeline(p) or ((p / "flgcore.json").is_file() and not (p / "text_encoder").is_dir())


def pipeline_of(transformer_dir: Path) -> str | None:
    """The pipeline folder a transformer folder belongs to, recorded in the flgcore.json of what is made from it."""
    parent = Path(transformer_dir).resolve().parent
    return str(parent) if is_pipeline(parent) else None


def _index(pipeline: Path) -> dict:
    try:
        index = json.loads((pipeline / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FlgError(f"{pipeline}/model_index.json: not readable ({type(e).__name__})") from None
    if index.get("_class_name") not in PIPELINES:
        raise FlgError(f"{pipeline}: pipeline {index.get('_class_name')!r} is not supported; supported: {', '.join(PIPELINES)}")
    return index


def image_conditioned(pipeline: str | Path) -> bool:
    return _index(Path(pipeline))["_class_name"].endswith("ImageToVideoPipeline")


def recipe_name(pipeline: str | Path) -> str | None:
    """The folder under configs/real/ whose stage configs (the paper's recipe for that model) fit this pipeline:
    Wan 2.2 TI2V (timestep per latent frame), Wan 2.1 I2V, Wan 2.1 T2V or HunyuanVideo-I2V; None for HunyuanVideo
    T2V, which the paper does not distil."""
    index = _index(Path(pipeline))
    if index.get("expand_timesteps"):
        return "wan2.2-ti2v-5b"
    return {"WanPipeline": "wan2.1-t2v-1.3b", "WanImageToVideoPipeline": "wan2.1-i2v-14b",
            "HunyuanVideoImageToVideoPipeline": "hunyuanvideo-i2v"}.get(index["_class_name"])


class _SeededScheduler:
    """Mixed into a student's scheduler: its re-noising draws come from per-video generators (the stock
    pipelines pass none to `scheduler.step`, which would draw from torch's global stream, batch-dependent)."""
    generators: list[torch.Generator] | None = None

    def step(self, *args, generator=None, **kwargs):
        return super().step(*args, generator=generator or self.generators, **kwargs)


@dataclass
class Loaded:
    pipe: object
    kind: str               # "teacher", "full", "drop", "skip" (given blocks pruned away), "pruned" or "student"
    family: str
    image_conditioned: bool
    call: dict              # fixed pipeline-call arguments (steps, guidance, size)
    info: dict              # what metrics.json records about the sampler


def resolve(model: str, base: str | None = None) -> tuple[Path, dict | None]:
    """(pipeline folder, the flgcore model's metadata or None for a plain pipeline)."""
    p = Path(model)
    if is_pipeline(p):
        _index(p)
        return p, None
    if not (p / "flgcore.json").is_file():
        raise FlgError(f"model={model}: neither a diffusers pipeline folder (model_index.json) nor a flgcore model folder")
    meta = json.loads((p / "flgcore.json").read_text())
    pipeline = base or meta.get("pipeline")
    if not pipeline:
        raise FlgError(f"{model} does not record the pipeline it was made from: pass base=<diffusers pipeline folder>")
    if not is_pipeline(pipeline):
        raise FlgError(f"{model} was made from the pipeline {pipeline}, which is not a pipeline folder here"
                       + ("" if base else ": pass base=<its folder>"))
    _index(Path(pipeline))
    return Path(pipeline), meta


def load(model: str, base: str | None = None, view: str = "full", spec: PipeSpec | None = None,
         device: str = "cpu") -> Loaded:
    """The stock pipeline of `model`'s family with `model`'s transformer (and a student's scheduler) in it."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler
    from .models import family_of, load_transformer
    from .sampling import scheduler_shift
    from .surgery import complement, prune
    spec = spec or PipeSpec()
    spec.check(view)
    pipeline, meta = resolve(model, base)
    gpu = str(device).startswith("cuda")
    dtype = torch.bfloat16 if spec.precision == "bf16" or (spec.precision == "auto" and gpu) else torch.float32
    kind = "teacher" if meta is None else meta.get("kind", "pruned")
    kind = {"stage2": view, "diffusers": "teacher"}.get(kind, kind)
    if view == "drop" and (meta is None or "drop" not in meta):
        raise FlgError(f"{model} has no saved drop set (view=drop needs a Stage-II model)")
    drop = list(spec.drop) or (list(meta["drop"]) if view == "drop" else [])
    kind = "skip" if spec.drop else kind
    extra = {}
    if meta is not None or drop:  # the flgcore model's transformer, or a pruned one, replaces the pipeline's
        transformer = load_transformer((Path(model) if meta is not None else pipeline) / "transformer",
                                       dtype=dtype)  # loaded in its dtype: diffusers keeps its fp32 modules
        if drop:
            transformer = prune(transformer, complement(transformer, drop))
        extra["transformer"] = transformer
    index = _index(pipeline)
    if "transformer_2" in index:  # Wan 2.2 A14B's low-noise expert: not part of what flgcore compresses
        extra["transformer_2"] = None
    # the pipeline's own class: DiffusionPipeline.from_pretrained silently ignores a transformer= passed to it
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(pipeline, torch_dtype=dtype, **extra)
    family = family_of(pipe.transformer).name
    shift = scheduler_shift(pipeline)
    call: dict = {}
    if kind == "student":
        sched_dir = Path(model) / "scheduler"
        if not sched_dir.is_dir():
            raise FlgError(f"{model}: a student folder without scheduler/ (export it with flg stage3)")
        cls = type("SeededFlowMatchLCMScheduler", (_SeededScheduler, FlowMatchLCMScheduler), {})
        pipe.scheduler = cls.from_pretrained(sched_dir)
        call["num_inference_steps"] = spec.steps or int(meta["steps"])
        if spec.guidance_scale is not None:
            call["guidance_scale"] = spec.guidance_scale
        elif family == "wan":  # no CFG; HunyuanVideo's guidance_scale is an input of the network (embedded
            call["guidance_scale"] = 1.0  # guidance, as the student was trained), and its true CFG is off by default
    else:
        if spec.scheduler == "euler":
            pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        call["num_inference_steps"] = spec.steps or 50
        if spec.guidance_scale is not None:
            call["guidance_scale"] = spec.guidance_scale
    for key, value in (("height", spec.height), ("width", spec.width), ("num_frames", spec.frames)):
        if value is not None:
            call[key] = value
    if spec.vae_tiling:
        pipe.vae.enable_tiling()
    if spec.vae_slicing:
        pipe.vae.enable_slicing()
    if spec.cpu_offload:
        if not gpu:
            raise FlgError("cpu_offload=true needs device=cuda (it moves each model to the GPU when it runs)")
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    info = dict(kind=kind, pipeline=str(pipeline), scheduler=type(pipe.scheduler).__name__.replace("Seeded", ""),
                steps=call["num_inference_steps"], shift=shift,
                guidance_scale=call.get("guidance_scale", _call_default(pipe, "guidance_scale")),
                dtype=str(dtype).replace("torch.", ""), blocks=sum(len(getattr(pipe.transformer, a))
                                                                  for _, a, _ in family_of(pipe.transformer).groups))
    return Loaded(pipe, kind, family, image_conditioned(pipeline), call, info)


def nfe(loaded: Loaded) -> int:
    """Transformer evaluations per video: steps, twice with Wan's CFG (HunyuanVideo's guidance is an input of the
    network, one evaluation a step, while its true CFG is off, as the pipelines default)."""
    cfg = (loaded.info["guidance_scale"] or 1.0) > 1 and loaded.family == "wan"
    return int(loaded.info["steps"]) * (2 if cfg else 1)


def _call_default(pipe, name: str):
    import inspect
    return inspect.signature(type(pipe).__call__).parameters[name].default


def video_size(loaded: Loaded) -> tuple[int, int]:
    """(height, width) the pipeline makes: the call's, else its __call__ defaults."""
    return tuple(int(loaded.call.get(k, _call_default(loaded.pipe, k))) for k in ("height", "width"))


def _encode(loaded: Loaded, prompt: str, image=None) -> dict[str, torch.Tensor]:
    """One prompt's pipeline inputs (batch 1), as the pipeline itself would encode them."""
    pipe, dev = loaded.pipe, loaded.pipe._execution_device
    if loaded.family == "wan":
        cfg = loaded.call.get("guidance_scale", 5.0) > 1  # 5.0: the Wan pipelines' default
        pe, ne = pipe.encode_prompt(prompt, None, cfg, 1, max_sequence_length=512, device=dev)
        return dict(prompt_embeds=pe, **({"negative_prompt_embeds": ne} if ne is not None else {}))
    if loaded.image_conditioned:  # HunyuanVideo-I2V: LLaVA reads the image with the prompt
        kind = pipe.transformer.config.image_condition_type
        enc = pipe.encode_prompt(image=image, prompt=prompt, device=dev,
                                 image_embed_interleave=4 if kind == "token_replace" else 2)
    else:
        enc = pipe.encode_prompt(prompt=prompt, device=dev)
    return dict(zip(("prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask"), enc))


def generate(loaded: Loaded, prompt: str | list[str], seeds: list[int], image=None) -> np.ndarray:
    """Videos [len(seeds), F, H, W, 3] uint8, one per seed, in one pipeline call: of one prompt, or of one prompt per
    seed (text-to-video: several prompts per batch), each distinct prompt encoded once.

    The prompts are encoded here and handed over as embeddings: with num_videos_per_prompt > 1 Wan 2.1 I2V's
    pipeline repeats its CLIP image tokens per prompt, not per video, and HunyuanVideo-I2V's encodes one video's
    worth of LLaVA tokens and one image's latents (diffusers 0.42)."""
    prompts = [prompt] * len(seeds) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(seeds):
        raise FlgError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    if loaded.image_conditioned and (image is None or len(set(prompts)) > 1):
        raise FlgError(f"this pipeline is image-conditioned: one prompt and its image per call (got {len(set(prompts))} "
                       f"prompts{' and no image' if image is None else ''})")
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]  # CPU generators: the same noise on every device
    if isinstance(loaded.pipe.scheduler, _SeededScheduler):
        loaded.pipe.scheduler.generators = [torch.Generator().manual_seed(int(s) + RENOISE_OFFSET) for s in seeds]
    with torch.no_grad():
        encoded = {p: _encode(loaded, p, image) for p in dict.fromkeys(prompts)}
        kw = {k: torch.cat([encoded[p][k] for p in prompts]) for k in encoded[prompts[0]]}
        if loaded.image_conditioned:
            kw["image"] = image if loaded.family == "wan" else [image] * len(seeds)  # HunyuanVideo: one per video
        out = loaded.pipe(generator=gens, output_type="np", **loaded.call, **kw).frames
    video = np.asarray(out, dtype=np.float32)
    return (video * 255).round().clip(0, 255).astype(np.uint8)


def write_video(frames: np.ndarray, path: Path, fps: int) -> Path:
    import imageio.v2 as imageio
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimwrite(path, list(frames), fps=fps, codec="libx264", macro_block_size=1, quality=9)
    return path


def contact_sheet(videos: list[np.ndarray], path: Path, frames: int = 6, width: int = 160) -> Path:
    """A PNG with one row per video: `frames` frames spread over its length, each scaled to `width` pixels."""
    from PIL import Image
    rows = []
    for v in videos:
        idx = np.linspace(0, len(v) - 1, min(frames, len(v))).round().astype(int)
        h = max(1, round(v.shape[1] * width / v.shape[2]))
        tiles = [np.asarray(Image.fromarray(v[i]).resize((width, h), Image.BILINEAR)) for i in idx]
        rows.append(np.concatenate(tiles, axis=1))
    w = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 2), (0, w - r.shape[1]), (0, 0))) for r in rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path)
    return path
