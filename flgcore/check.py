"""`flg check`: say what is wrong with a stage config before any GPU time is spent.

Reads only configs, JSON files and safetensors headers (no weights are loaded), so it runs on a login
node in seconds: paths, the checkpoint's class and block counts, block indices against them, the latent
cache against the transformer (latent channels, text width, image condition present iff the model is
image-conditioned; a Wan model without extra input channels takes either, T2V or Wan 2.2 TI2V), the
global batch against the number of processes, and DeepSpeed's presence.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import load_config
from .models import BUILTIN, FAMILIES, check_attention
from .config import FlgError
from .runs import check_precision
from .surgery import check_compile

STAGES = {"cache": ("cache", "CacheConfig"), "stage1": ("importance", "Stage1Config"),
          "stage2": ("stage2", "Stage2Config"), "stage3": ("stage3", "Stage3Config")}


def _transformer_config(model: str) -> tuple[dict | None, dict, list[str]]:
    """(transformer config, flgcore.json meta, problems) for a model directory, read from JSON only."""
    p = BUILTIN.get(model, Path(model))
    for cand in (p, p / "transformer"):
        if (cand / "config.json").is_file():
            tcfg = json.loads((cand / "config.json").read_text())
            meta_path = (p if cand != p else p.parent) / "flgcore.json"
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
            if tcfg.get("_class_name") not in FAMILIES:
                return None, meta, [f"model={model}: class {tcfg.get('_class_name')!r} is not supported ({', '.join(FAMILIES)})"]
            if tcfg.get("image_condition_type") not in (None, "latent_concat", "token_replace"):
                return tcfg, meta, [f"model={model}: HunyuanVideo image_condition_type {tcfg['image_condition_type']!r} "
                                    f"is not supported (latent_concat, token_replace are)"]
            if not meta:  # a plain diffusers checkpoint: its scheduler gives the sigma shift (flgcore.json's otherwise)
                from .sampling import scheduler_shift
                try:
                    scheduler_shift(cand.parent)
                except FlgError as e:
                    return tcfg, meta, [f"model={model}: {e}"]
            return tcfg, meta, []
    return None, {}, [f"model={model}: no transformer config.json there (a diffusers pipeline or transformer directory?)"]


def n_blocks(tcfg: dict) -> int:
    if tcfg["_class_name"] == "HunyuanVideoTransformer3DModel":
        return tcfg["num_layers"] + tcfg["num_single_layers"]
    return tcfg["num_layers"]


def _check_indices(name: str, idx, n: int) -> list[str]:
    bad = [i for i in (idx or []) if not 0 <= i < n]
    return [f"{name}: block indices {bad} out of range for a model with {n} blocks (0..{n - 1})"] if bad else []


def _check_cache(data: str, tcfg: dict | None) -> list[str]:
    from safetensors import safe_open
    folder = Path(data)
    if not folder.is_dir():
        return [f"data={data}: no such folder (run `flg cache` first)"]
    shards = sorted(p for p in folder.glob("*.safetensors") if p.name != "null.safetensors")
    problems = [] if shards else [f"data={data}: no shards (*.safetensors)"]
    if not (folder / "null.safetensors").is_file():
        problems.append(f"data={data}: null.safetensors (the empty prompt) is missing")
    if not shards or tcfg is None:
        return problems
    with safe_open(str(shards[0]), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        stacked = "clips" in (f.metadata() or {})
    lead = 1 if stacked else 0
    out_ch = tcfg.get("out_channels") or tcfg["in_channels"]
    if "latents" not in shapes:
        return problems + [f"data={data}: {shards[0].name} has no 'latents'"]
    if shapes["latents"][lead] != out_ch:
        problems.append(f"data={data}: latents have {shapes['latents'][lead]} channels, the transformer {out_ch}")
    text_dim = tcfg.get("text_dim") or tcfg.get("text_embed_dim")
    if "prompt_embeds" in shapes and shapes["prompt_embeds"][-1] != text_dim:
        problems.append(f"data={data}: prompt_embeds width {shapes['prompt_embeds'][-1]}, the transformer expects {text_dim}")
    image_conditioned = tcfg["in_channels"] != out_ch or tcfg.get("image_condition_type") == "token_replace"
    ti2v_capable = tcfg["_class_name"] == "WanTransformer3DModel" and not image_conditioned  # T2V or Wan 2.2 TI2V
    if image_conditioned != ("image_latents" in shapes) and not ti2v_capable:
        problems.append(f"data={data}: the transformer is {'image' if image_conditioned else 'text'}-conditioned but the "
                        f"cache {'lacks' if image_conditioned else 'has'} image_latents")
    return problems


def check_stage(stage: str, config: str | None, overrides: list[str], processes: int = 1) -> tuple[object, list[str]]:
    """(the resolved config, a list of one-line problems; empty when the config is ready to launch)."""
    import importlib
    if stage not in STAGES:
        raise FlgError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    mod, cls = STAGES[stage]
    cfg = load_config(getattr(importlib.import_module(f"flgcore.{mod}"), cls), config, overrides)
    problems: list[str] = []
    if stage == "cache":
        if not (Path(cfg.pipeline) / "model_index.json").is_file():
            problems.append(f"pipeline={cfg.pipeline}: no model_index.json (a local diffusers pipeline directory)")
        if not Path(cfg.manifest).is_file():
            problems.append(f"manifest={cfg.manifest}: not found")
        if (cfg.frames - 1) % 4:
            problems.append(f"frames={cfg.frames}: the Wan and HunyuanVideo VAEs need 4k+1 frames")
        if cfg.height % 16 or cfg.width % 16:
            problems.append(f"height x width = {cfg.height}x{cfg.width}: must be multiples of 16")
        return cfg, problems
    tcfg, meta, found = _transformer_config(cfg.model)
    problems += found
    if cfg.data != "synth":
        problems += _check_cache(cfg.data, tcfg)
    elif tcfg is not None and not meta:
        problems.append(f"data=synth needs a flgcore model with a text encoder; give data=<latent cache folder> for {cfg.model}")
    n = n_blocks(tcfg) if tcfg else None
    if stage == "stage2" and n is not None:
        if cfg.selection:
            if not Path(cfg.selection).is_file():
                problems.append(f"selection={cfg.selection}: not found (run Stage I first)")
            else:
                problems += _check_indices("selection", json.loads(Path(cfg.selection).read_text()).get("dropped"), n)
        elif not cfg.drop:
            problems.append("no candidate blocks: give selection=<stage1 selection.json> or drop=[...]")
        problems += _check_indices("drop", cfg.drop, n)
    if stage == "stage3" and n is not None:
        drop = cfg.drop if cfg.drop is not None else meta.get("drop")
        if drop is None and cfg.retention != 1.0:
            problems.append(f"model={cfg.model}: no saved drop set (give a Stage-II model, drop=[...] or retention=1.0)")
        problems += _check_indices("drop", drop, n)
    if stage in ("stage2", "stage3"):
        for check, args in ((check_attention, [cfg.attention]), (check_precision, [cfg.precision]),
                            (check_compile, [cfg.compile, cfg.zero])):
            try:
                check(*args)
            except FlgError as e:
                problems.append(str(e))
        if cfg.batch_size % processes:
            problems.append(f"batch_size={cfg.batch_size} (global) is not divisible by {processes} processes")
        if processes > 1 and not cfg.zero:
            problems.append(f"{processes} processes but zero=false: every process would train its own copy")
        if cfg.zero:
            import importlib.util
            if importlib.util.find_spec("deepspeed") is None:
                problems.append("zero=true but DeepSpeed is not installed (pip install 'flgcore[cluster]')")
    return cfg, problems
