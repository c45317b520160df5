"""Loading diffusers video transformers and calling them the same way across families.

The families differ in two places only, both kept here in small tables: where the DiT blocks live
(`FAMILIES`, used by `surgery`) and how a forward is called (`velocity`: Wan T2V, Wan I2V with the
mask and the condition latents concatenated on channels, HunyuanVideo with its attention mask,
pooled text and embedded guidance; Wan 2.2 TI2V and HunyuanVideo-I2V token_replace with the first
latent frame replaced by the image's at timestep 0). Everything else in flgcore is family-agnostic.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import diffusers

from .config import FlgError
from . import flow
from .flow import TIMESTEP_SCALE

ASSETS = Path(__file__).parent / "assets"
BUILTIN = {"synth-tiny": ASSETS / "synth-tiny", "synth-tiny-student": ASSETS / "synth-tiny-student"}


@dataclass(frozen=True)
class Family:
    name: str
    groups: tuple[tuple[str, str, str], ...]  # (group label, module-list attribute, config key)


FAMILIES = {
    "WanTransformer3DModel": Family("wan", (("block", "blocks", "num_layers"),)),
    "HunyuanVideoTransformer3DModel": Family(
        "hunyuan",
        (("double", "transformer_blocks", "num_layers"),
         ("single", "single_transformer_blocks", "num_single_layers")),
    ),
}


def family_of(model) -> Family:
    name = type(model).__name__
    if name not in FAMILIES:
        raise FlgError(f"unsupported model class {name!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


# ----------------------------------------------------------------------------- loading

def resolve_model_dir(path_or_name: str | Path) -> Path:
    """Map a built-in name or a model / pipeline directory to the transformer's directory."""
    p = BUILTIN.get(str(path_or_name), Path(path_or_name))
    for cand in (p, p / "transformer"):
        if (cand / "config.json").is_file():
            return cand
    raise FlgError(f"{path_or_name}: no transformer config.json found (expected a diffusers transformer "
                   f"or pipeline directory, or one of: {', '.join(BUILTIN)})")


def fingerprint(path_or_name: str | Path) -> str:
    """16 hex digits of sha256 over a model directory's (or one file's) relative names and contents, so that
    a cached result is never reused for other weights under the same name or path (a new `synth-tiny`, a
    Stage-II run redone into the same folder). A file over 64 MiB contributes its size and first and last
    MiB: enough to tell checkpoints apart without reading gigabytes. `tiny:` names are their own print."""
    import hashlib
    if str(path_or_name).startswith("tiny:"):
        return str(path_or_name)
    p = BUILTIN.get(str(path_or_name), Path(path_or_name))
    if p.name == "transformer" and (p.parent / "flgcore.json").is_file():
        p = p.parent  # the text encoder and sampling metadata beside it belong to the model too
    if not p.exists():
        raise FlgError(f"{path_or_name}: no such model or file")
    files = sorted([p] if p.is_file() else (q for q in p.rglob("*") if q.is_file()))
    key = (str(p.resolve()), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _PRINTS:  # a sweep asks for the same model's print once per candidate folder
        h = hashlib.sha256()
        for f in files:
            h.update(str(f.relative_to(p.parent if p.is_file() else p)).encode())
            with open(f, "rb") as fh:
                size = f.stat().st_size
                if size > 64 * 2 ** 20:
                    h.update(str(size).encode()); h.update(fh.read(2 ** 20)); fh.seek(-2 ** 20, 2)
                h.update(fh.read())
        _PRINTS[key] = h.hexdigest()[:16]
    return _PRINTS[key]


_PRINTS: dict[tuple, str] = {}


def model_class_name(model_dir: Path) -> str:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlgError(f"{model_dir}/config.json is not valid JSON: {e}") from None
    name = config.get("_class_name", "") if isinstance(config, dict) else ""
    if name not in FAMILIES:
        raise FlgError(f"{model_dir}: found model class {name or '(none)'!r}; supported: {', '.join(FAMILIES)}")
    return name


def load_transformer(path_or_name: str | Path, dtype: torch.dtype | None = None, device: str = "cpu"):
    """Load a diffusers transformer strictly: missing, unexpected or meta-device weights are refused.

    diffusers' from_pretrained never raises on a config that disagrees with the checkpoint (it loads
    the first N blocks, or leaves extra ones on the meta device), so we check its loading info.
    """
    model_dir = resolve_model_dir(path_or_name)
    cls = getattr(diffusers, model_class_name(model_dir))
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):  # before diffusers logs about it
        raise FlgError(f"{model_dir}: no weights (*.safetensors) beside its config.json")
    try:
        model, info = cls.from_pretrained(model_dir, output_loading_info=True, **kwargs)
    except OSError as e:  # a truncated or corrupt weights file
        raise FlgError(f"{model_dir}: cannot load its weights ({str(e).strip().splitlines()[0]})") from None
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if bad or meta:
        first = (meta or [str(v[0]) for v in bad.values()])[0]
        raise FlgError(f"{model_dir}: weights do not match the config ({', '.join(bad) or 'meta tensors'}; "
                       f"first: {first})")
    return model.to(device).eval()


def skeleton(path_or_name: str | Path):
    """The transformer's architecture with its parameters on the meta device: block sizes without reading weights."""
    model_dir = resolve_model_dir(path_or_name)
    cls = getattr(diffusers, model_class_name(model_dir))
    with torch.device("meta"):
        return cls.from_config(cls.load_config(model_dir))


# ----------------------------------------------------------------------------- tiny models

TINY = {
    # Shapes follow diffusers' own CPU test configs, with a few more blocks so surgery has room.
    "wan-t2v": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=4, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)),
    # Wan 2.1 I2V's input: [latents, a first-frame mask of the VAE's temporal factor (4) channels, condition]
    "wan-i2v": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4 + 4 + 4,
        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=4, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32)),
    "hunyuan": ("HunyuanVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
        num_single_layers=3, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))),
    "hunyuan-i2v-tr": ("HunyuanVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
        num_single_layers=3, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type="token_replace")),
    "hunyuan-i2v": ("HunyuanVideoTransformer3DModel", dict(
        in_channels=4 + 4 + 1, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
        num_single_layers=3, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type="latent_concat")),
}
TINY["wan-ti2v"] = TINY["wan-t2v"]  # Wan 2.2 TI2V has T2V's shape; the image enters by replacing frame 0


def tiny_model(kind: str = "wan-i2v", seed: int = 0, **overrides):
    """A tiny random-init model of a real diffusers class, for tests (kinds: see `TINY`)."""
    if kind not in TINY:
        raise FlgError(f"unknown tiny model {kind!r}; choose from {', '.join(TINY)}")
    cls_name, cfg = TINY[kind]
    torch.manual_seed(seed)
    model = getattr(diffusers, cls_name)(**{**cfg, **overrides})
    # Random init leaves the output projection near zero in some families; perturb every weight a bit
    # so that skipping a block measurably changes the output in tests.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


# ----------------------------------------------------------------------------- calling

@dataclass
class Cond:
    """Everything a family's forward needs besides (x, s). Batch-first tensors.

    text [B, L, D] prompt embeddings; image [B, C, F, H, W] the condition latents (frame 0 is the
    first frame, the rest as the family's pipeline builds them) or None for T2V; text_mask [B, L] and
    pooled [B, P] for HunyuanVideo; image_embeds [B, N, D] for Wan 2.1 I2V's CLIP tokens.
    """
    text: torch.Tensor
    image: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    guidance: float = 6.0  # HunyuanVideo's embedded (distilled) guidance scale

    def map(self, fn) -> Cond:
        """Apply fn to every tensor field (slicing, repeating, moving devices)."""
        return replace(self, **{k: fn(v) for k, v in vars(self).items() if torch.is_tensor(v)})

    def with_text(self, other: Cond) -> Cond:
        """This condition with the text fields of `other` (used to build the null condition for CFG)."""
        return replace(self, text=other.text, text_mask=other.text_mask, pooled=other.pooled)


def to_device(device, *xs):
    """Move tensors and Conds to `device`. Training data and noise are drawn on the CPU, so a run's random
    stream is the same on every device; only the arithmetic moves."""
    out = [x.map(lambda t: t.to(device)) if isinstance(x, Cond) else x.to(device) for x in xs]
    return out[0] if len(out) == 1 else out


def cat_conds(conds: list[Cond]) -> Cond:
    """Concatenate conditions along the batch (e.g. cond + null for one batched CFG forward)."""
    first = conds[0]
    out = {}
    for k, v in vars(first).items():
        out[k] = torch.cat([getattr(c, k) for c in conds]) if torch.is_tensor(v) else v
    return Cond(**out)


def _first_frame_mask(x: torch.Tensor, channels: int) -> torch.Tensor:
    mask = torch.zeros(x.shape[0], channels, *x.shape[2:], dtype=x.dtype, device=x.device)
    mask[:, :, 0] = 1
    return mask


def replaces_first_frame(model, cond: Cond) -> bool:
    """Wan 2.2 TI2V (a Wan model without extra input channels, given an image condition; the pipeline's
    `expand_timesteps`) and HunyuanVideo-I2V `token_replace` are conditioned by replacing latent frame 0
    with the image latent, whose tokens see timestep 0."""
    cfg = model.config
    if cond.image is None:
        return False
    if family_of(model).name == "hunyuan":
        return cfg.image_condition_type == "token_replace"
    return cfg.in_channels == cfg.out_channels


def _wan_call(model, x, t, cond: Cond):
    cfg = model.config
    if cfg.in_channels != cfg.out_channels:  # I2V: [noisy latents, first-frame mask, condition latents]
        if cond.image is None:
            raise FlgError("this Wan model is image-conditioned (in_channels > out_channels): pass an image condition")
        mask_ch = cfg.in_channels - 2 * cfg.out_channels
        x = torch.cat([x, _first_frame_mask(x, mask_ch), cond.image.to(x.dtype)], dim=1)
    elif cond.image is not None:  # TI2V (`velocity` has put the image latent at frame 0): its tokens at timestep 0
        pt, ph, pw = cfg.patch_size
        f, h, w = x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
        per_frame = t[:, None, None].expand(-1, f, h * w).clone()
        per_frame[:, 0] = 0
        t = per_frame.flatten(1)  # [B, tokens]: the transformer's per-token timestep path
    return model(hidden_states=x, timestep=t, encoder_hidden_states=cond.text.to(x.dtype),
                 encoder_hidden_states_image=None if cond.image_embeds is None else cond.image_embeds.to(x.dtype),
                 return_dict=False)[0]


def _hunyuan_call(model, x, t, cond: Cond):
    cfg = model.config
    if cfg.image_condition_type is not None and cond.image is None:
        raise FlgError("this HunyuanVideo model is image-conditioned: pass an image condition")
    if cfg.image_condition_type == "latent_concat":  # [noisy latents, condition latents, first-frame mask]
        x = torch.cat([x, cond.image.to(x.dtype), _first_frame_mask(x, 1)], dim=1)
    elif cfg.image_condition_type not in (None, "token_replace"):  # token_replace: frame 0 set by `velocity`
        raise FlgError(f"HunyuanVideo image_condition_type {cfg.image_condition_type!r} is not supported "
                       f"(supported: latent_concat, token_replace, None)")
    b = x.shape[0]
    mask = cond.text_mask if cond.text_mask is not None else torch.ones(b, cond.text.shape[1], device=x.device)
    pooled = cond.pooled if cond.pooled is not None else torch.zeros(b, cfg.pooled_projection_dim, device=x.device)
    guidance = torch.full((b,), cond.guidance * TIMESTEP_SCALE, device=x.device, dtype=x.dtype) if cfg.guidance_embeds else None
    return model(hidden_states=x, timestep=t, encoder_hidden_states=cond.text.to(x.dtype),
                 encoder_attention_mask=mask, pooled_projections=pooled.to(x.dtype), guidance=guidance,
                 return_dict=False)[0]


CALLS = {"wan": _wan_call, "hunyuan": _hunyuan_call}


def velocity(model, x: torch.Tensor, s: torch.Tensor, cond: Cond) -> torch.Tensor:
    """v_theta(x_s, s, c): the model's velocity for noisy latents x [B, C, F, H, W] at sigmas s [B].

    Real Wan/HunyuanVideo checkpoints predict v. A model whose `flg_prediction` is "x0" (the pixel-space
    testbed teacher: see pretrain.py) predicts x0 and is converted here, v = (x_s - x0_hat) / s, so that
    everything downstream works in v alike. Samplers never evaluate at s = 0.
    """
    dtype = next(model.parameters()).dtype
    t = (s * TIMESTEP_SCALE).to(dtype)
    first = replaces_first_frame(model, cond)
    c0 = cond.image[:, :, :1].to(x.dtype) if first else None
    x_in = torch.cat([c0, x[:, :, 1:]], dim=2) if first else x
    out = CALLS[family_of(model).name](model, x_in.to(dtype), t, cond).to(x.dtype)
    s_ = s.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    if getattr(model, "flg_prediction", "velocity") == "x0":
        out = (x - out) / s_
    if first:
        # The pipeline overwrites frame 0 with the condition and ignores the model there. We return the
        # velocity whose x0 is exactly the condition, (x - c) / s: Euler steps then land on c at s = 0, and
        # every flow-matching or DMD term is exactly zero on frame 0 when c is the clip's own first latent.
        out = torch.cat([(x[:, :, :1] - c0) / s_, out[:, :, 1:]], dim=2)
    return out


def velocity_cfg(model, x: torch.Tensor, s: torch.Tensor, cond: Cond, null: Cond, scale: float) -> torch.Tensor:
    """CFG velocity with cond and null batched into one forward (scale 1: one conditional forward)."""
    if scale == 1.0:
        return velocity(model, x, s, cond)
    v = velocity(model, torch.cat([x, x]), torch.cat([s, s]), cat_conds([cond, null]))
    v_c, v_n = v.chunk(2)
    return v_n + scale * (v_c - v_n)


def check_attention(backend: str) -> str:
    """A diffusers attention backend name (`attention_dispatch.AttentionBackendName`), checked before any work."""
    from diffusers.models.attention_dispatch import AttentionBackendName
    names = [b.value for b in AttentionBackendName]
    if str(backend).lower() not in names:
        raise FlgError(f"attention must be a diffusers attention backend, got {backend!r}; e.g. native, "
                       f"_native_cudnn, _native_flash, _flash_3 (all: {', '.join(names)})")
    return str(backend).lower()


def set_attention(model, backend: str) -> None:
    """Route every attention call of `model` through one diffusers backend. "native" (the default) is torch's
    SDPA choosing its own kernel; "_native_cudnn" forces cuDNN's fused attention (PyTorch 2.5's release notes
    report it up to 75 % faster than FlashAttention-2 on H100; not yet measured here: `flg bench --gpu
    attention=[native,_native_cudnn]`). Self-attention is ~70 % of a Wan 1.3B step's FLOPs at 480p x 81
    frames (32760 tokens), so its kernel sets the MFU. "_flash_3" needs FlashAttention 3 installed. Copies made
    later (the pruned student, a full fake DiT) keep the setting; saved models and other models do not."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry as registry
    backend = check_attention(backend)
    active = registry.get_active_backend()[0]
    if backend == active and all(getattr(getattr(m, "processor", None), "_attention_backend", None) is None
                                 for m in model.modules()):
        return  # already the default; diffusers would only log its "experimental" warning
    try:
        model.set_attention_backend(backend)
    except (RuntimeError, ValueError, ImportError) as e:  # a kernel package missing or too old
        raise FlgError(f"attention={backend}: {str(e).splitlines()[0]}") from None
    finally:
        # diffusers also makes it the process-wide default, which every model loaded later would silently use
        # (a bench of `_native_math` changed the numerics of a training run after it); keep it to this model.
        registry.set_active_backend(active)


def load_model(name: str | Path, dtype: torch.dtype | None = None, device: str = "cpu"):
    """`tiny:<kind>` gives a tiny random model (see `TINY`); anything else goes to `load_transformer`."""
    if str(name).startswith("tiny:"):
        return tiny_model(str(name)[5:]).to(device)
    return load_transformer(name, dtype, device)


def probe_inputs(model, batch: int = 2, frames: int = 2, size: int = 8, seed: int = 0):
    """Random (x, s, cond) shaped for `model`: for equality checks of surgery and export."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    c = cfg.out_channels or cfg.in_channels
    pt = cfg.patch_size[0] if isinstance(cfg.patch_size, (list, tuple)) else getattr(cfg, "patch_size_t", 1)
    x = torch.randn(batch, c, frames * pt, size, size, generator=g)
    text_dim = getattr(cfg, "text_dim", None) or cfg.text_embed_dim
    image_conditioned = cfg.in_channels != c or getattr(cfg, "image_condition_type", None) == "token_replace"
    image = torch.randn(x.shape, generator=g) if image_conditioned else None
    cond = Cond(text=torch.randn(batch, 4, text_dim, generator=g), image=image)
    return x, torch.rand(batch, generator=g), cond


# ----------------------------------------------------------------------------- training loss and export

def flow_matching_loss(model, x0, eps, s, cond, min_sigma: float = 0.05) -> torch.Tensor:
    """Flow-matching v-loss. For an x0-predicting model, v = (x_s - x0_hat) / s with s clamped at
    `min_sigma` in the loss only (as JiT does), so low-noise samples do not dominate: the loss is then
    ||(x0_hat - x0) / max(s, min_sigma)||^2."""
    x_s = flow.add_noise(x0, eps, s)
    if getattr(model, "flg_prediction", "velocity") == "x0":
        x0_hat = x_s - s.reshape(-1, 1, 1, 1, 1) * velocity(model, x_s, s, cond)
        w = s.clamp_min(min_sigma).reshape(-1, 1, 1, 1, 1)
        return ((x0_hat.float() - x0) / w).pow(2).mean()
    return torch.nn.functional.mse_loss(velocity(model, x_s, s, cond).float(), flow.velocity_target(x0, eps))


def export_model(model, encoder, out: Path, meta: dict) -> Path:
    """Write a model directory: transformer/ (diffusers), text_encoder/ (the testbed's `synth.TextEncoder`; none for a real
    checkpoint, whose text encoder stays in its pipeline), flgcore.json (sampling defaults)."""
    from .runs import atomic_write_text
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "transformer")
    if encoder is not None:
        encoder.save(out / "text_encoder")
    atomic_write_text(out / "flgcore.json", json.dumps(meta, indent=2) + "\n")
    return out
