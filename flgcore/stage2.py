"""Stage II (`flg stage2`): dynamic probabilistic pruning with self-distillation (paper Sec. 3.3, Eqs. 5-7).

One weight set is trained so that its drop view (the Stage-I candidate blocks skipped) matches its
full view. Each step draws which candidates to skip from a Bernoulli(p); `drop_mode` says whether
the draw is per block or one draw for the whole set (the paper does not say). The loop keeps to
plain PyTorch (bf16 is a plain autocast over fp32 master weights, no hooks) so that with `zero=true` a
DeepSpeed ZeRO-3 engine stands in for the model and optimiser (`zero.py`), under torchrun or the
deepspeed launcher.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import flow, train, zero
from .config import FlgError, check_values
from .data import training_source
from .models import export_model, set_attention, velocity
from .runs import autocast, ema_update, read_json, start_run, write_json
from .surgery import blocks, check_indices, skipping
from .train import Runtime

def stage2_loss(v_drop: torch.Tensor, v_full: torch.Tensor | None, x0: torch.Tensor, eps: torch.Tensor,
                alpha: float, weight: torch.Tensor | None = None,
                v_teacher: torch.Tensor | None = None, full_distill: bool = False) -> tuple[torch.Tensor, dict]:
    """Eqs. 5-7. All tensors [B, C, F, H, W]; returns (scalar loss, its parts as floats).

    L = a ||v_drop - sg(v_full)||^2 + (1 - a) (||v_drop - (eps - x0)||^2 + ||v_full - (eps - x0)||^2)

    (the paper's target x0 - x1 is a sign slip; diffusers' convention is v ~ eps - x0). With a = 1
    only the distillation term remains and the full view needs no gradient at all. `weight` [B]
    optionally scales each sample's velocities (see `loss_weight`). `v_teacher` replaces sg(v_full) as
    the distillation target (`target: frozen`: the model as it was before Stage II); v_full may then be
    None when a = 1. `full_distill` adds a ||v_full - v_teacher||^2 (`views: both` with a frozen target: the
    full view distils toward the teacher in the same step as the drop view, not in the other half of the steps).
    """
    target = flow.velocity_target(x0, eps).float()
    v_teacher = (v_full if v_teacher is None else v_teacher).float()
    v_drop, v_full = v_drop.float(), None if v_full is None else v_full.float()
    if weight is not None:
        w = weight.float().reshape(-1, *([1] * (v_drop.dim() - 1)))
        target, v_drop, v_teacher = target * w, v_drop * w, v_teacher * w
        v_full = None if v_full is None else v_full * w
    distill = (v_drop - v_teacher.detach()).pow(2).mean()
    if full_distill:
        distill = distill + (v_full - v_teacher.detach()).pow(2).mean()
    loss = alpha * distill
    parts = dict(distill=float(distill.detach()))
    if alpha < 1:
        train = (v_drop - target).pow(2).mean() + (v_full - target).pow(2).mean()
        loss = loss + (1 - alpha) * train
        parts["train"] = float(train.detach())
    return loss, parts


def loss_weight(model, s: torch.Tensor, min_sigma: float) -> torch.Tensor | None:
    """For an x0-predicting model v = (x_s - x0_hat) / s, so a velocity error is an x0 error blown up by
    1/s^2 at low noise. Scaling velocities by s / max(s, min_sigma) caps that at 1/min_sigma^2, as the
    teacher was trained (models.flow_matching_loss). Real (v-predicting) checkpoints get no weight."""
    if getattr(model, "flg_prediction", "velocity") != "x0":
        return None
    return s / s.clamp_min(min_sigma)


def draw_drop(candidates: list[int], p: float, mode: str, gen: torch.Generator) -> list[int]:
    """Which candidate blocks the drop view skips this step."""
    if mode == "per_block":
        return [c for c, u in zip(candidates, torch.rand(len(candidates), generator=gen)) if u < p]
    if mode == "whole_set":
        return list(candidates) if torch.rand(1, generator=gen).item() < p else []
    raise FlgError(f"drop_mode must be 'whole_set' or 'per_block', got {mode!r}")


@dataclass
class Stage2Config(Runtime):  # + the runtime keys (threads, device, precision, zero, ...)
    model: str = "synth-tiny"       # a flgcore model, or a diffusers transformer/pipeline directory
    data: str = "synth"              # "synth" (SynthMotion) or a latent cache folder (see data.py)
    out: str = "runs/stage2"
    selection: str | None = None     # a Stage-I selection.json; its "dropped" blocks are the candidates
    drop: list[int] = field(default_factory=list)  # or the candidate blocks given directly
    alpha: float = 1.0               # distill weight (Eq. 6); 1 - alpha weighs the ground-truth terms (Eq. 5)
    # the distillation target: "shared" (the paper's literal Eq. 6: sg of the same weights' full view, which
    # moves as they train) or "frozen" (a frozen copy of the model before Stage II: output distillation, so
    # alpha = 1 keeps the original model as its anchor)
    target: str = "shared"
    p: float = 0.5                   # Bernoulli probability of skipping
    # whole_set (default): one draw skips all candidates or none. The deployed student skips the whole
    # set; per_block would show that exact view only p^k of the time for k candidates.
    drop_mode: str = "whole_set"
    # sampled (the paper): each step trains the view that p drew. both: every step skips the whole candidate set
    # and trains the full view beside it (toward the frozen target when there is one), so p is not used
    views: str = "sampled"
    steps: int = 400
    batch_size: int = 16
    lr: float = 2e-4
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.0           # 0: no EMA
    cond_dropout: float = 0.1
    shift: float | None = None       # training sigma shift; None: the model's saved shift
    min_sigma: float = 0.05          # x0-predicting models only: the loss's 1/s is capped here (see loss_weight)
    seed: int = 0
    ckpt_every: int = 50
    log_every: int = 10


def frozen_copy(model):
    """A copy of `model` that never trains: the distillation target of `target: frozen`."""
    import copy
    frozen = copy.deepcopy(model).eval()
    frozen.flg_prediction = getattr(model, "flg_prediction", "velocity")
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def candidate_blocks(cfg: Stage2Config, model) -> list[int]:
    if cfg.selection and cfg.drop:
        raise FlgError("give either selection or drop, not both")
    if cfg.selection:
        sel = read_json(cfg.selection)
        n = len(blocks(model))
        if sorted(sel.get("kept", []) + sel.get("dropped", [])) != list(range(n)):
            raise FlgError(f"{cfg.selection}: its keep set covers blocks {sorted(sel.get('kept', []) + sel.get('dropped', []))}, "
                           f"but the model has {n} blocks (0..{n - 1})")
        return check_indices(model, sel["dropped"], "dropped block index")
    if not cfg.drop:
        raise FlgError("no candidate blocks: give selection=<stage1 selection.json> or drop=[...]")
    return check_indices(model, cfg.drop, "dropped block index")


def check_config(cfg: Stage2Config) -> None:
    check_values(cfg)  # ranges of steps, sizes, rates, seeds, sigmas; paths that must exist
    if not 0 <= cfg.alpha <= 1:
        raise FlgError(f"alpha must be in [0, 1], got {cfg.alpha}")
    if not 0 < cfg.p <= 1:
        raise FlgError(f"p must be in (0, 1], got {cfg.p}")
    draw_drop([], cfg.p, cfg.drop_mode, torch.Generator())  # validates drop_mode
    if cfg.target not in ("shared", "frozen"):
        raise FlgError(f"target must be 'shared' or 'frozen', got {cfg.target!r}")
    if cfg.views not in ("sampled", "both"):
        raise FlgError(f"views must be 'sampled' or 'both', got {cfg.views!r}")
    if cfg.target == "frozen" and cfg.zero:
        raise FlgError("target=frozen is not supported with zero=true (the frozen copy would not be partitioned)")
    if cfg.zero and cfg.ema_decay > 0:
        raise FlgError("ema_decay > 0 is not supported with zero=true (the weights are partitioned)")
    train.check_runtime(cfg)


def run_stage2(cfg: Stage2Config) -> dict:
    from .sampling import load_bundle
    check_config(cfg)
    dev = train.start(cfg)
    main = zero.is_main()
    bundle = load_bundle(cfg.model, device="cpu" if cfg.zero else dev)
    model = bundle.model
    set_attention(model, cfg.attention)
    cands = candidate_blocks(cfg, model)
    source = training_source(cfg.data, bundle.encoder)
    out = Path(cfg.out)
    if (done := start_run(cfg, out, main)) is not None:
        return done
    shift = cfg.shift if cfg.shift is not None else bundle.meta.get("shift", 1.0)
    model = model.float().train()  # fp32 master weights: bf16 runs under autocast (or DeepSpeed's bf16)
    teacher = frozen_copy(model) if cfg.target == "frozen" else None  # before compiling: a plain eager copy
    train.prepare(model, cfg)
    upd = train.Updater(model, dict(model.named_parameters()), cfg, lr=cfg.lr, betas=(0.9, 0.99),
                        weight_decay=cfg.weight_decay, warmup=cfg.warmup, steps=cfg.steps, grad_clip=cfg.grad_clip,
                        batch_size=cfg.batch_size)
    model = upd.model
    gen = torch.Generator().manual_seed(cfg.seed)
    np_rng = np.random.default_rng(cfg.seed)
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()} if cfg.ema_decay > 0 else None
    step, st = train.resume(out, cfg, {"model": upd}, {"noise": gen}, np_rng)
    ema = {k: v.to(dev) for k, v in st["ema"].items()} if st.get("ema") else ema

    bar = tqdm(total=cfg.steps, initial=step, desc="stage2", dynamic_ncols=True, disable=not main)
    log = train.StepLog(out / "log.jsonl", cfg.log_every, cfg.steps, main)
    while step < cfg.steps:
        x0, cond = source(np_rng, gen, cfg.batch_size, cfg.cond_dropout)
        eps = torch.randn(x0.shape, generator=gen)
        s = flow.sample_sigmas(cfg.batch_size, shift, gen)
        drop = draw_drop(cands, cfg.p, cfg.drop_mode, gen) if cfg.views == "sampled" else list(cands)
        x0, cond, eps, s = train.local_batch(cfg, dev, x0, cond, eps, s)
        if cfg.zero and cfg.precision == "bf16":  # the engine's weights are bf16, and so must the conditions be
            cond = cond.map(lambda t: t.to(torch.bfloat16))
        x_s = flow.add_noise(x0, eps, s)
        with autocast(cfg.precision, dev, cfg.zero):
            full_distill = cfg.views == "both" and teacher is not None
            with torch.set_grad_enabled(cfg.alpha < 1 or full_distill):  # else alpha = 1: sg(v_full) needs no graph
                v_full = velocity(model, x_s, s, cond) if teacher is None or cfg.alpha < 1 or full_distill else None
            with torch.no_grad():
                v_teacher = velocity(teacher, x_s, s, cond) if teacher is not None else None
            with skipping(model, drop):
                v_drop = velocity(model, x_s, s, cond)
        loss, parts = stage2_loss(v_drop, v_full, x0, eps, cfg.alpha, loss_weight(model, s, cfg.min_sigma), v_teacher,
                                  full_distill)
        train.check_finite(loss, "loss", step, out, cfg)
        upd.backward(loss)
        gnorm = upd.step()
        step += 1
        if ema is not None:
            ema_update(ema, model, cfg.ema_decay, step)
        row = {k: train.mean_over_ranks(cfg, v) for k, v in dict(loss=loss.item(), **parts).items()}
        log.add(step, dict(row, n_dropped=len(drop)), grad_norm=gnorm, lr=upd.lr())
        bar.update(1); bar.set_postfix(loss=f"{row['loss']:.4f}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            train.save(out, step, cfg, {"model": upd}, {"noise": gen}, np_rng, ema=ema)
    bar.close()

    final = train.final_model(upd, cfg)
    if final is None:  # a ZeRO-3 rank other than 0: rank 0 writes
        zero.barrier()
        return {}
    if ema is not None:
        final.load_state_dict(ema)
    final = final.float().eval()
    meta = dict(bundle.meta, kind="stage2", drop=cands, keep=[b.index for b in blocks(model) if b.index not in cands],
                alpha=cfg.alpha, drop_mode=cfg.drop_mode, target=cfg.target, views=cfg.views, trained_steps=step)
    export_model(final, bundle.encoder, out / "model", meta)
    metrics = dict(steps=step, candidates=cands, final_loss=json.loads((out / "log.jsonl").read_text().splitlines()[-1])["loss"])
    write_json(out / "metrics.json", metrics)
    if cfg.zero:
        zero.barrier()
    return metrics
