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
Supported: Wan 2.1/2.2 pipelines with channel-concatenated image conditions (T2V, I2V), Wan 2.2 TI2V-5B
(`expand_timesteps`: the first frame's latent replaces latent frame 0), HunyuanVideo (T2V) and
HunyuanVideo-I2V with `latent_concat` conditioning (its prompt is encoded with the first frame by LLaVA,
as the pipeline does; the null prompt with a black image, as its true CFG does) and with `token_replace`
(the first frame's latent replaces latent frame 0; LLaVA keeps every 4th image token, as the pipeline does).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import check_values, save_config
from .config import FlgError
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
    max_sequence_length: int = 0    # text tokens; 0: the family pipeline's default (Wan 512, HunyuanVideo 256)
    dtype: str = "float32"    # text/image encoders' dtype ("bfloat16" on a GPU); the cache is written in float32
    vae_dtype: str = "float32"  # the VAE's: float32 as diffusers loads Wan's (the latents are the training targets)
    vae_tiling: bool = False  # tiled VAE encoding: HunyuanVideo at 720p needs it (slight blending at tile seams)
    device: str = "cpu"


def read_manifest(path: str | Path) -> list[dict]:
    """Rows {video: absolute path, caption: str} from a CSV (header video,caption) or a JSONL file."""
    import pandas as pd
    p = Path(path)
    if not p.is_file():
        raise FlgError(f"manifest not found: {p}")
    try:
        df = pd.read_json(p, lines=True) if p.suffix in (".jsonl", ".json") else pd.read_csv(p, keep_default_na=False)
    except (ValueError, UnicodeDecodeError) as e:  # pandas' parser and empty-data errors are ValueErrors
        raise FlgError(f"manifest {p}: cannot be read as {'JSONL' if p.suffix in ('.jsonl', '.json') else 'CSV'} "
                       f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
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


def _first_frame_image(x: torch.Tensor):
    """[3, F, H, W] in [-1, 1] -> the first frame as a PIL image (what a pipeline's `image=` argument takes)."""
    from PIL import Image
    return Image.fromarray(((x[:, 0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())


class WanEncoder:
    """The Wan pipeline's own encoders, used as the pipeline uses them (latents normalised with the VAE's
    latents_mean / latents_std; the I2V condition = VAE([first frame, zeros...]), normalised likewise; the
    Wan 2.2 TI2V condition = VAE(first frame) alone, placed at latent frame 0)."""
    max_sequence_length = 512  # the pipeline's default

    def __init__(self, pipe, dtype: torch.dtype, device: str, image_conditioned: bool, max_len: int, ti2v: bool = False):
        self.pipe, self.device, self.dtype, self.image_conditioned = pipe, device, dtype, image_conditioned or ti2v
        self.ti2v = ti2v
        self.max_len = max_len or self.max_sequence_length
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
        z = self.pipe.vae.encode(video.to(self.device, self.pipe.vae.dtype)).latent_dist.mode().float().cpu()
        return (z - self.mean) / self.std

    @torch.no_grad()
    def _text(self, caption: str) -> dict[str, torch.Tensor]:
        e = self.pipe._get_t5_prompt_embeds([caption], max_sequence_length=self.max_len, device=self.device,
                                            dtype=self.dtype)
        return dict(prompt_embeds=e[0].float().cpu())

    def null(self) -> dict[str, torch.Tensor]:
        """The empty prompt's text fields (null.safetensors)."""
        return self._text("")

    @torch.no_grad()
    def clip(self, x: torch.Tensor, caption: str) -> dict[str, torch.Tensor]:
        """x [3, F, H, W] in [-1, 1] and its caption -> the clip's tensors (no leading batch dimension)."""
        item = dict(latents=self._vae(x[None])[0], **self._text(caption))
        if self.ti2v:
            item["image_latents"] = self._first_frame_condition(x, item["latents"])
        elif self.image_conditioned:
            cond = torch.cat([x[:, :1], torch.zeros_like(x[:, 1:])], dim=1)
            item["image_latents"] = self._vae(cond[None])[0]
            if getattr(self.pipe, "image_encoder", None) is not None:
                item["image_embeds"] = self.pipe.encode_image(_first_frame_image(x), self.device)[0].float().cpu()
        return item

    def _first_frame_condition(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The first frame's latent, encoded alone, at latent frame 0 and zeros after (Wan 2.2 TI2V, HunyuanVideo-I2V)."""
        cond = torch.zeros_like(latents)
        cond[:, :1] = self._vae(x[None, :, :1])[0]
        return cond


class HunyuanEncoder(WanEncoder):
    """The HunyuanVideo pipelines' own encoders: latents = VAE mode x scaling_factor; text = the pipeline's
    `encode_prompt` (Llama hidden states + mask, CLIP pooled; for I2V, LLaVA sees the first frame too); the
    latent_concat condition = the first frame's latent at latent frame 0 and zeros after, as the pipeline
    concatenates it. The null prompt is "" (with a black image for I2V, as the pipeline's true CFG does)."""
    max_sequence_length = 256

    def __init__(self, pipe, dtype: torch.dtype, device: str, image_conditioned: bool, max_len: int,
                 interleave: int = 2):
        self.pipe, self.device, self.dtype, self.image_conditioned = pipe, device, dtype, image_conditioned
        self.interleave = interleave  # LLaVA image tokens kept: every 2nd (latent_concat), every 4th (token_replace)
        self.max_len = max_len or self.max_sequence_length
        self.scale = pipe.vae.config.scaling_factor
        self.t_scale, self.s_scale = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial

    @torch.no_grad()
    def _vae(self, video: torch.Tensor) -> torch.Tensor:
        return self.pipe.vae.encode(video.to(self.device, self.pipe.vae.dtype)).latent_dist.mode().float().cpu() * self.scale

    @torch.no_grad()
    def _text(self, caption: str, image=None) -> dict[str, torch.Tensor]:
        kw = dict(image=image, image_embed_interleave=self.interleave) if self.image_conditioned else {}
        e, pooled, mask = self.pipe.encode_prompt(prompt=[caption], device=self.device, dtype=self.dtype,
                                                  max_sequence_length=self.max_len, **kw)
        return dict(prompt_embeds=e[0].float().cpu(), prompt_mask=mask[0].float().cpu(), pooled=pooled[0].float().cpu())

    def null(self) -> dict[str, torch.Tensor]:
        from PIL import Image
        return self._text("", Image.new("RGB", (64, 64), 0) if self.image_conditioned else None)

    @torch.no_grad()
    def clip(self, x: torch.Tensor, caption: str) -> dict[str, torch.Tensor]:
        image = _first_frame_image(x) if self.image_conditioned else None
        item = dict(latents=self._vae(x[None])[0], **self._text(caption, image))
        if self.image_conditioned:
            item["image_latents"] = self._first_frame_condition(x, item["latents"])
        return item


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlgError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise FlgError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def open_encoder(cfg: CacheConfig) -> WanEncoder:
    """The family's encoder for a pipeline directory; the transformer's weights are never loaded."""
    root = Path(cfg.pipeline)
    index = root / "model_index.json"
    if not index.is_file():
        raise FlgError(f"pipeline={cfg.pipeline!r}: no model_index.json (give a local diffusers pipeline directory)")
    index_cfg = _read_json(index)
    name = index_cfg.get("_class_name", "")
    tcfg_path = root / "transformer" / "config.json"
    if not tcfg_path.is_file():
        raise FlgError(f"{root}: transformer/config.json is missing (needed to know the conditioning)")
    tcfg = _read_json(tcfg_path)
    ti2v = name.startswith("Wan") and bool(index_cfg.get("expand_timesteps"))
    if name not in ("WanPipeline", "WanImageToVideoPipeline", "HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline"):
        raise FlgError(f"{root}: flg cache supports the Wan and HunyuanVideo (T2V, I2V) pipelines; got {name!r}")
    if name == "HunyuanVideoImageToVideoPipeline" and tcfg.get("image_condition_type") not in ("latent_concat", "token_replace"):
        raise FlgError(f"{root}: HunyuanVideo-I2V image_condition_type {tcfg.get('image_condition_type')!r} is not "
                       f"supported (supported: latent_concat, token_replace)")
    dtype, vae_dtype = (getattr(torch, d, None) for d in (cfg.dtype, cfg.vae_dtype))
    for key, value, got in (("dtype", cfg.dtype, dtype), ("vae_dtype", cfg.vae_dtype, vae_dtype)):
        if not isinstance(got, torch.dtype):
            raise FlgError(f"{key}={value!r} is not a torch dtype")
    import diffusers
    # the pipeline's own class: DiffusionPipeline.from_pretrained ignores transformer=None and loads the weights
    pipe = getattr(diffusers, name).from_pretrained(root, transformer=None, torch_dtype={"vae": vae_dtype, "default": dtype},
                                             **({"transformer_2": None} if name.startswith("Wan") else {})).to(cfg.device)
    if cfg.vae_tiling:
        pipe.vae.enable_tiling()
    if name.startswith("Hunyuan"):
        return HunyuanEncoder(pipe, dtype, cfg.device, name == "HunyuanVideoImageToVideoPipeline", cfg.max_sequence_length,
                              4 if tcfg.get("image_condition_type") == "token_replace" else 2)
    return WanEncoder(pipe, dtype, cfg.device, tcfg["in_channels"] != (tcfg.get("out_channels") or tcfg["in_channels"]),
                      cfg.max_sequence_length, ti2v)


def latent_decoder(pipeline: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """`decode(latents [B, C, F, H, W]) -> clips [B, 3, F', H', W'] in [-1, 1]` with a pipeline's VAE, undoing
    the normalisation `flg cache` applied (Wan: latents_mean / latents_std; HunyuanVideo: scaling_factor)."""
    import diffusers
    vae_dir = Path(pipeline) / "vae"
    if not (vae_dir / "config.json").is_file():
        raise FlgError(f"{pipeline}: no vae/ (decoding latents into clips needs the diffusers pipeline directory)")
    name = json.loads((vae_dir / "config.json").read_text()).get("_class_name", "")
    vae = getattr(diffusers, name).from_pretrained(vae_dir, torch_dtype=dtype).to(device).eval()
    cfg = vae.config

    @torch.no_grad()
    def decode(z: torch.Tensor) -> torch.Tensor:
        if getattr(cfg, "latents_mean", None) is not None:
            shape = (1, -1, 1, 1, 1)
            z = z * torch.tensor(cfg.latents_std).view(shape) + torch.tensor(cfg.latents_mean).view(shape)
        else:
            z = z / cfg.scaling_factor
        return torch.cat([vae.decode(z[i:i + 1].to(device, dtype)).sample.float().clamp(-1, 1).cpu()
                          for i in range(len(z))])  # one clip at a time: a VAE decode is the memory peak
    return decode


def _write_shard(path: Path, items: list[dict], names: list[str]) -> None:
    from safetensors.torch import save_file
    tensors = {k: torch.stack([it[k] for it in items]).contiguous() for k in items[0]}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"clips": str(len(items)), "videos": json.dumps(names)})
    os.replace(tmp, path)


def run_cache(cfg: CacheConfig) -> dict:
    check_values(cfg)
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
        write_item(out / "null.safetensors", **enc.null())
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
                items.append(enc.clip(x, row["caption"]))
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


# ----------------------------------------------------------------------------- offline tokenizers (tiny pipelines, flg bench --gpu)

def _word_tokenizer(words: set[str], special: list[str], bos: str | None = None):
    """A word-level fast tokenizer built offline (no download): specials first, then words; "\n" runs are tokens."""
    from tokenizers import Regex, Tokenizer, models as tk_models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {s: i for i, s in enumerate(special)}
    for w in sorted(words - set(special)):
        vocab[w] = len(vocab)
    tok = Tokenizer(tk_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\n+"), "isolated")
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    named = dict(pad_token="<pad>", unk_token="<unk>", eos_token=special[2], bos_token=bos)
    return PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=special[3:],
                                   **{k: v for k, v in named.items() if v}), vocab
