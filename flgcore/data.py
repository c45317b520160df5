"""Training data for Stages I-II: SynthMotion (the testbed) or a folder of cached latents (real models).

A latent cache is a folder of `.safetensors` files, one per clip, each holding what the transformer is
called with: `latents` [C, F, H, W] (the VAE latents of the clip), `prompt_embeds` [L, D] and, as the
family needs them, `image_latents` [C', F, H, W] (the image condition, built as the family's pipeline
builds it), `prompt_mask` [L], `pooled` [P], `image_embeds` [N, D]; plus `null.safetensors` with the same
text fields for the empty prompt (the null condition of CFG and of condition dropout). Encoding clips
with the real VAE and text encoders happens once, elsewhere (a GPU job); the stages only read tensors,
so a real checkpoint trains with nothing more than `data=<cache folder>`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import synth
from .models import Cond
from .config import FlgError

TEXT_FIELDS = {"prompt_embeds": "text", "prompt_mask": "text_mask", "pooled": "pooled"}
IMAGE_FIELDS = {"image_latents": "image", "image_embeds": "image_embeds"}


def _cond(items: list[dict]) -> Cond:
    kw = {}
    for key, field in {**TEXT_FIELDS, **IMAGE_FIELDS}.items():
        if key in items[0]:
            kw[field] = torch.stack([it[key] for it in items]).float()
    if "text" not in kw:
        raise FlgError("latent cache items need prompt_embeds")
    return Cond(**kw)


class LatentCache:
    """Random access to a latent cache folder (see the module docstring): one-clip files and shards
    (a file whose metadata says `clips`: every tensor carries a leading clip dimension) alike."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open
        from safetensors.torch import load_file
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FlgError(f"latent cache {folder}: no such folder")
        files = sorted(p for p in self.folder.glob("*.safetensors") if p.name != "null.safetensors")
        if not files:
            raise FlgError(f"latent cache {folder}: no .safetensors clips")
        if not (self.folder / "null.safetensors").is_file():
            raise FlgError(f"latent cache {folder}: null.safetensors (the empty prompt's embeddings) is missing")
        self.index: list[tuple[Path, int | None]] = []  # (file, row in a shard or None for a one-clip file)
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                n = (h.metadata() or {}).get("clips")
            self.index += [(f, None)] if n is None else [(f, r) for r in range(int(n))]
        self._open = safe_open
        self.null = load_file(self.folder / "null.safetensors")

    def __len__(self) -> int:
        return len(self.index)

    def _item(self, i: int) -> dict:
        f, row = self.index[i]
        with self._open(str(f), framework="pt") as h:
            return {k: h.get_tensor(k) if row is None else h.get_slice(k)[row] for k in h.keys()}

    def items(self, idx) -> tuple[torch.Tensor, Cond]:
        items = [self._item(int(i)) for i in idx]
        if any("latents" not in it for it in items):
            raise FlgError(f"latent cache {self.folder}: an item lacks 'latents'")
        return torch.stack([it["latents"] for it in items]).float(), _cond(items)

    def null_like(self, cond: Cond) -> Cond:
        """The null condition for a batch: the empty prompt's text fields, the batch's image fields."""
        b = cond.text.shape[0]
        text = {field: self.null[key].float()[None].expand(b, *self.null[key].shape).clone()
                for key, field in TEXT_FIELDS.items() if key in self.null}
        return cond.with_text(Cond(**text)) if "text" in text else cond

    def train_batch(self, rng: np.random.Generator, gen: torch.Generator, batch_size: int,
                    cond_dropout: float = 0.1) -> tuple[torch.Tensor, Cond]:
        x0, cond = self.items(rng.integers(0, len(self), size=batch_size))
        drop = torch.rand(batch_size, generator=gen) < cond_dropout
        if drop.any():
            null = self.null_like(cond)
            for f in ("text", "text_mask", "pooled"):
                a, n = getattr(cond, f), getattr(null, f)
                if a is not None and n is not None:
                    a[drop] = n[drop].to(a.dtype)
        return x0, cond


def write_item(path: str | Path, **tensors: torch.Tensor) -> Path:
    """Write one cache item (or null.safetensors) from named tensors."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    return path


def write_probe_cache(model, folder: str | Path, n: int = 4, frames: int = 2, size: int = 8) -> Path:
    """A latent cache of `n` random items shaped for `model` (tests and dry runs of a real config)."""
    from .models import probe_inputs
    folder = Path(folder)
    hunyuan = type(model).__name__.startswith("Hunyuan")
    for i in range(n):
        x, _, cond = probe_inputs(model, batch=1, frames=frames, size=size, seed=i)
        item = dict(latents=x[0], prompt_embeds=cond.text[0])
        if cond.image is not None:
            item["image_latents"] = cond.image[0]
        if hunyuan:
            item.update(prompt_mask=torch.ones(cond.text.shape[1]), pooled=torch.randn(model.config.pooled_projection_dim))
        write_item(folder / f"clip_{i:03d}.safetensors", **item)
    null = dict(prompt_embeds=torch.zeros_like(cond.text[0]))
    if hunyuan:
        null.update(prompt_mask=torch.ones(cond.text.shape[1]), pooled=torch.zeros(model.config.pooled_projection_dim))
    write_item(folder / "null.safetensors", **null)
    return folder


def training_source(data: str, encoder: synth.TextEncoder | None):
    """`train_batch(rng, gen, B, cond_dropout)` for `data`: "synth" (SynthMotion with the model's text
    encoder) or a latent cache folder."""
    if data == "synth":
        if encoder is None:
            raise FlgError("data=synth needs a flgcore model with a text encoder (synth-tiny or a stage output); "
                           "for a diffusers checkpoint give data=<latent cache folder>")
        return lambda rng, gen, b, p: synth.train_batch(encoder, rng, gen, b, p)
    return LatentCache(data).train_batch


def condition_source(data: str, encoder: synth.TextEncoder | None):
    """`draw(np_rng, B) -> (x_ref, cond, null)` for Stage III: full conditions as at inference (no dropout),
    the null condition for CFG, and reference clips/latents that fix the shape of the student's noise."""
    if data == "synth":
        if encoder is None:
            raise FlgError("data=synth needs a flgcore model with a text encoder; give data=<latent cache folder>")

        def draw(rng, b):
            x_ref, specs = synth.clips(synth.train_seeds(rng, b))
            cond = synth.make_cond(encoder, x_ref, [sp.caption for sp in specs])
            return x_ref, cond, synth.null_cond(encoder, cond)
        return draw
    cache = LatentCache(data)

    def draw(rng, b):
        x_ref, cond = cache.items(rng.integers(0, len(cache), size=b))
        return x_ref, cond, cache.null_like(cond)
    return draw

