"""Stage 0, `flg cache`: encode mp4 + captions once into sharded safetensors of what a real DiT is called with.

From a local diffusers pipeline directory (its VAE, text encoder and tokenizer, and image encoder where
the family has one; the transformer itself is never loaded, only its config.json is read to know whether
it is image-conditioned) and a manifest of videos with captions, write `shard_00000.safetensors`, ...
each holding `shard_size` clips stacked on a leading dimension: `latents`, `prompt_embeds`, and for an
image-conditioned transformer `image_latents` (+ `image_embeds` for Wan 2.1 I2V's CLIP tokens), built
exactly as the family's pipeline builds them; plus `null.safetensors` (the empty prompt) and
`cache.json`. `data.LatentCache` reads the folder, so Stages I-III train with `data=<out>`.

Resumable: shard k always holds manifest rows [k*S, (k+1)*S) and a shard is written atomically, so a
finished shard is skipped on restart. A video that cannot be read (missing, corrupt, too short) is
reported by name in `skipped.jsonl` and left out of its shard; the rest goes on.
Supported: Wan 2.1/2.2 pipelines with channel-concatenated image conditions (T2V, I2V). HunyuanVideo
and Wan 2.2 TI2V-5B (first-frame latent replacement) are refused with a message, not guessed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import save_config
from .models import FlgError
from .runs import write_json


@dataclass
class CacheConfig:
    pipeline: str = ""        # local diffusers pipeline directory (model_index.json, vae/, text_encoder/, ...)
    manifest: str = ""        # CSV with columns video,caption (or JSONL with those keys); paths relative to it
    out: str = "runs/cache"
    frames: int = 81          # frames per clip (Wan: 4k+1); the first `frames` frames every `frame_stride`
    frame_stride: int = 1
    height: int = 480
    width: int = 832
    shard_size: int = 32
    max_sequence_length: int = 512  # Wan's T5 length
    dtype: str = "float32"    # encoders' dtype ("bfloat16" on a GPU); the cache is written in float32
    device: str = "cpu"


def read_manifest(path: str | Path) -> list[dict]:
    """Rows {video: absolute path, caption: str} from a CSV (header video,caption) or a JSONL file."""
    import pandas as pd
    p = Path(path)
    if not p.is_file():
        raise FlgError(f"manifest not found: {p}")
    df = pd.read_json(p, lines=True) if p.suffix in (".jsonl", ".json") else pd.read_csv(p, keep_default_na=False)
    missing = {"video", "caption"} - set(df.columns)
    if missing:
        raise FlgError(f"manifest {p}: missing column(s) {', '.join(sorted(missing))} (need video,caption)")
    return [dict(video=str((p.parent / str(v)).resolve()), caption=str(c)) for v, c in zip(df["video"], df["caption"])]


def read_clip(path: str, frames: int, stride: int, height: int, width: int) -> torch.Tensor:
    """A video file -> [3, frames, H, W] in [-1, 1]: centre crop to the target aspect, then resize."""
    import imageio.v2 as imageio
    from PIL import Image
    out = []
    try:
        with imageio.get_reader(path, "ffmpeg") as reader:
            for i, frame in enumerate(reader):
                if i % stride:
                    continue
                im = Image.fromarray(frame).convert("RGB")
                w, h = im.size
                scale = min(w / width, h / height)
                cw, ch = round(width * scale), round(height * scale)
                im = im.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
                out.append(np.asarray(im.resize((width, height), Image.BICUBIC)))
                if len(out) == frames:
                    break
    except Exception as e:  # imageio/ffmpeg raise many types for a broken file; the caller reports it by name
        raise ValueError(f"unreadable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if len(out) < frames:
        raise ValueError(f"too short: {len(out)} frames at stride {stride}, need {frames}")
    x = torch.from_numpy(np.stack(out)).permute(3, 0, 1, 2).float()
    return x / 127.5 - 1.0


class WanEncoder:
    """The Wan pipeline's own encoders, used as the pipeline uses them (latents normalised with the VAE's
    latents_mean / latents_std; the I2V condition = VAE([first frame, zeros...]), normalised likewise)."""

    def __init__(self, pipeline_dir: Path, dtype: torch.dtype, device: str, image_conditioned: bool):
        from diffusers import DiffusionPipeline
        self.pipe = DiffusionPipeline.from_pretrained(pipeline_dir, transformer=None, transformer_2=None,
                                                      torch_dtype=dtype).to(device)
        self.device, self.dtype, self.image_conditioned = device, dtype, image_conditioned
        vae = self.pipe.vae
        self.mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        self.t_scale = vae.config.scale_factor_temporal
        self.s_scale = vae.config.scale_factor_spatial

    def check(self, cfg: CacheConfig) -> None:
        if (cfg.frames - 1) % self.t_scale:
            raise FlgError(f"frames={cfg.frames}: this VAE needs {self.t_scale}k+1 frames")
        if cfg.height % (2 * self.s_scale) or cfg.width % (2 * self.s_scale):
            raise FlgError(f"height x width = {cfg.height}x{cfg.width} must be multiples of {2 * self.s_scale}")

    @torch.no_grad()
    def _vae(self, video: torch.Tensor) -> torch.Tensor:
        z = self.pipe.vae.encode(video.to(self.device, self.dtype)).latent_dist.mode().float().cpu()
        return (z - self.mean) / self.std

    @torch.no_grad()
    def text(self, captions: list[str], max_len: int) -> torch.Tensor:
        return self.pipe._get_t5_prompt_embeds(captions, max_sequence_length=max_len, device=self.device,
                                               dtype=self.dtype).float().cpu()

    @torch.no_grad()
    def clip(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [3, F, H, W] in [-1, 1] -> the clip's tensors (no leading batch dimension)."""
        item = dict(latents=self._vae(x[None])[0])
        if self.image_conditioned:
            cond = torch.cat([x[:, :1], torch.zeros_like(x[:, 1:])], dim=1)
            item["image_latents"] = self._vae(cond[None])[0]
            if getattr(self.pipe, "image_encoder", None) is not None:
                from PIL import Image
                img = Image.fromarray(((x[:, 0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())
                item["image_embeds"] = self.pipe.encode_image(img, self.device)[0].float().cpu()
        return item


def open_encoder(cfg: CacheConfig) -> WanEncoder:
    root = Path(cfg.pipeline)
    index = root / "model_index.json"
    if not index.is_file():
        raise FlgError(f"pipeline={cfg.pipeline!r}: no model_index.json (give a local diffusers pipeline directory)")
    name = json.loads(index.read_text()).get("_class_name", "")
    tcfg_path = root / "transformer" / "config.json"
    if not tcfg_path.is_file():
        raise FlgError(f"{root}: transformer/config.json is missing (needed to know the conditioning)")
    tcfg = json.loads(tcfg_path.read_text())
    if not name.startswith("Wan"):
        raise FlgError(f"{root}: flg cache supports Wan pipelines; got {name!r} (HunyuanVideo: not yet)")
    if name == "WanPipeline" and json.loads(index.read_text()).get("expand_timesteps"):
        raise FlgError(f"{root}: Wan 2.2 TI2V (expand_timesteps) conditioning is not supported yet")
    dtype = getattr(torch, cfg.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise FlgError(f"dtype={cfg.dtype!r} is not a torch dtype")
    return WanEncoder(root, dtype, cfg.device, tcfg["in_channels"] != (tcfg.get("out_channels") or tcfg["in_channels"]))


def _write_shard(path: Path, items: list[dict], names: list[str]) -> None:
    from safetensors.torch import save_file
    tensors = {k: torch.stack([it[k] for it in items]).contiguous() for k in items[0]}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"clips": str(len(items)), "videos": json.dumps(names)})
    os.replace(tmp, path)


def run_cache(cfg: CacheConfig) -> dict:
    if cfg.shard_size < 1 or cfg.frames < 1 or cfg.frame_stride < 1:
        raise FlgError("shard_size, frames and frame_stride must be >= 1")
    rows = read_manifest(cfg.manifest)
    enc = open_encoder(cfg)
    enc.check(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    from .data import write_item
    if not (out / "null.safetensors").is_file():
        write_item(out / "null.safetensors", prompt_embeds=enc.text([""], cfg.max_sequence_length)[0])
    n_shards = (len(rows) + cfg.shard_size - 1) // cfg.shard_size
    skipped_path = out / "skipped.jsonl"
    bar = tqdm(total=len(rows), desc="cache", unit="clip", dynamic_ncols=True)
    for k in range(n_shards):
        path = out / f"shard_{k:05d}.safetensors"
        chunk = rows[k * cfg.shard_size:(k + 1) * cfg.shard_size]
        if path.is_file():  # finished on an earlier run
            bar.update(len(chunk))
            continue
        items, names, skipped = [], [], []
        for row in chunk:
            try:
                x = read_clip(row["video"], cfg.frames, cfg.frame_stride, cfg.height, cfg.width)
            except ValueError as e:
                skipped.append(dict(video=row["video"], shard=k, error=str(e)))
                tqdm.write(f"skipping {row['video']}: {e}")
            else:
                item = enc.clip(x)
                item["prompt_embeds"] = enc.text([row["caption"]], cfg.max_sequence_length)[0]
                items.append(item)
                names.append(row["video"])
            bar.update(1)
        if skipped:  # recorded before the shard is committed: a restart re-tries the shard and re-reports
            with open(skipped_path, "a") as f:
                f.writelines(json.dumps(s) + "\n" for s in skipped)
        if items:
            _write_shard(path, items, names)
    bar.close()
    clips = sum(int(meta["clips"]) for meta in (_shard_meta(p) for p in sorted(out.glob("shard_*.safetensors"))))
    skipped = {json.loads(line)["video"] for line in skipped_path.read_text().splitlines()} if skipped_path.exists() else set()
    info = dict(clips=clips, shards=n_shards, skipped=len(skipped), manifest=str(Path(cfg.manifest).resolve()),
                pipeline=str(Path(cfg.pipeline).resolve()), frames=cfg.frames, height=cfg.height, width=cfg.width)
    write_json(out / "cache.json", info)
    print(f"cached {clips} clips in {n_shards} shards under {out}" + (f"; {len(skipped)} skipped (see {skipped_path})" if skipped else ""))
    return info


def _shard_meta(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


# ----------------------------------------------------------------------------- an offline tiny pipeline (tests, dry runs)

def write_tiny_pipeline(out: str | Path, image_conditioned: bool = True, seed: int = 0) -> Path:
    """Save a tiny random-init Wan pipeline of the real classes (AutoencoderKLWan, a T5 encoder with a
    word-level tokenizer built offline, the transformer from `models.TINY`, the flow-matching scheduler)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline
    from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel
    from .models import tiny_model
    from . import synth
    torch.manual_seed(seed)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(sorted(set(synth.VOCAB)))}}
    tok = Tokenizer(tk_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                           num_heads=2, relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.1, 0.2, 0.0],
                           latents_std=[1.5, 0.8, 1.2, 1.0]).eval()
    transformer = tiny_model("wan-i2v" if image_conditioned else "wan-t2v", seed)
    cls = WanImageToVideoPipeline if image_conditioned else WanPipeline
    pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
               scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.save_pretrained(out)
    return Path(out)
