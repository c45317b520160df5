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
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import flow, zero
from .data import training_source
from .config import save_config
from .models import check_attention, set_attention, to_device, velocity
from .config import FlgError
from .pretrain import export_model, sample_sigmas
from .runs import (autocast, check_precision, check_same_run, setup_torch, append_jsonl, ema_update, finished,
                   read_json, resume_train_state, save_train_state, warmup_cosine, write_json)
from .surgery import (blocks, check_compile, check_indices, checkpoint_share, compile_blocks, set_checkpointing,
                      skipping)


def stage2_loss(v_drop: torch.Tensor, v_full: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
                alpha: float, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Eqs. 5-7. All tensors [B, C, F, H, W]; returns (scalar loss, its parts as floats).

    L = a ||v_drop - sg(v_full)||^2 + (1 - a) (||v_drop - (eps - x0)||^2 + ||v_full - (eps - x0)||^2)

    (the paper's target x0 - x1 is a sign slip; diffusers' convention is v ~ eps - x0). With a = 1
    only the distillation term remains and the full view needs no gradient at all. `weight` [B]
    optionally scales each sample's velocities (see `loss_weight`).
    """
    target = flow.velocity_target(x0, eps).float()
    v_drop, v_full = v_drop.float(), v_full.float()
    if weight is not None:
        w = weight.float().reshape(-1, *([1] * (v_drop.dim() - 1)))
        target, v_drop, v_full = target * w, v_drop * w, v_full * w
    distill = (v_drop - v_full.detach()).pow(2).mean()
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
    teacher was trained (pretrain.pretrain_loss). Real (v-predicting) checkpoints get no weight."""
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
class Stage2Config:
    model: str = "synth-tiny"       # a flgcore model, or a diffusers transformer/pipeline directory
    data: str = "synth"              # "synth" (SynthMotion) or a latent cache folder (see data.py)
    out: str = "runs/stage2"
    selection: str | None = None     # a Stage-I selection.json; its "dropped" blocks are the candidates
    drop: list[int] = field(default_factory=list)  # or the candidate blocks given directly
    alpha: float = 1.0               # distill weight (Eq. 6); 1 - alpha weighs the ground-truth terms (Eq. 5)
    p: float = 0.5                   # Bernoulli probability of skipping
    # whole_set (default): one draw skips all candidates or none. The deployed student skips the whole
    # set; per_block would show that exact view only p^k of the time for k candidates.
    drop_mode: str = "whole_set"
    steps: int = 400
    batch_size: int = 16
    lr: float = 2e-4
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.0           # 0: no EMA
    precision: str = "fp32"          # fp32 or bf16: autocast over fp32 master weights (runs.autocast); loss in fp32
    cond_dropout: float = 0.1
    shift: float | None = None       # training sigma shift; None: the model's saved shift
    min_sigma: float = 0.05          # x0-predicting models only: the loss's 1/s is capped here (see loss_weight)
    seed: int = 0
    ckpt_every: int = 50
    log_every: int = 10
    threads: int = 0
    device: str = "cpu"              # "cuda": train on a GPU (data and noise are still drawn on the CPU)
    zero: bool = False               # DeepSpeed ZeRO-3 across the launcher's processes (batch_size is global)
    offload: bool = False            # zero=true: optimiser states and parameters offloaded to CPU memory
    grad_checkpointing: bool | float = False  # recompute activations in backward: true = every block, 0.5 = every other
    attention: str = "native"        # diffusers attention backend; "_native_cudnn" is faster on H100 (models.set_attention)
    compile: bool = False            # torch.compile each block in place (surgery.compile_blocks): a GPU speed lever


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


def run_stage2(cfg: Stage2Config) -> dict:
    from .sampling import load_bundle
    setup_torch(cfg.threads, cfg.device)
    if not 0 <= cfg.alpha <= 1:
        raise FlgError(f"alpha must be in [0, 1], got {cfg.alpha}")
    if not 0 < cfg.p <= 1:
        raise FlgError(f"p must be in (0, 1], got {cfg.p}")
    check_precision(cfg.precision)
    draw_drop([], cfg.p, cfg.drop_mode, torch.Generator())  # validates drop_mode before any work
    checkpoint_share(cfg.grad_checkpointing)
    check_attention(cfg.attention)
    check_compile(cfg.compile, cfg.zero)
    if cfg.zero and cfg.ema_decay > 0:
        raise FlgError("ema_decay > 0 is not supported with zero=true (the weights are partitioned)")
    dev = zero.init(cfg.device) if cfg.zero else cfg.device
    main = zero.is_main()
    bundle = load_bundle(cfg.model, device="cpu" if cfg.zero else dev)
    model = bundle.model
    set_attention(model, cfg.attention)
    cands = candidate_blocks(cfg, model)
    source = training_source(cfg.data, bundle.encoder)
    out = Path(cfg.out)
    check_same_run(cfg, out)
    if (done := finished(out, "model", cfg.steps)) is not None:
        return done
    if main:
        save_config(cfg, out)
    shift = cfg.shift if cfg.shift is not None else bundle.meta.get("shift", 1.0)
    model = model.float().train()  # fp32 master weights: bf16 runs under autocast (or DeepSpeed's bf16)
    set_checkpointing(model, cfg.grad_checkpointing)
    if cfg.compile:
        compile_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    sched = warmup_cosine(opt, cfg.warmup, cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    np_rng = np.random.default_rng(cfg.seed)
    if cfg.zero:
        engine = zero.engine(model, opt, sched, zero.ds_config(cfg.batch_size, cfg.grad_clip, cfg.precision == "bf16", cfg.offload))
        model, ema = engine.module, None
        step, _ = zero.resume(out, {"model": engine}, {"noise": gen}, np_rng)
    else:
        ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()} if cfg.ema_decay > 0 else None
        step, st = resume_train_state(out, model, opt, sched, {"noise": gen}, np_rng)
        ema = {k: v.to(dev) for k, v in st["ema"].items()} if st.get("ema") else ema
    kill_at = int(os.environ.get("FLG_TEST_KILL_AT_STEP", "0"))  # tests: SIGKILL ourselves mid-run

    bar = tqdm(total=cfg.steps, initial=step, desc="stage2", dynamic_ncols=True, disable=not main)
    logs, t0 = [], time.time()
    while step < cfg.steps:
        x0, cond = source(np_rng, gen, cfg.batch_size, cfg.cond_dropout)
        eps = torch.randn(x0.shape, generator=gen)
        s = sample_sigmas(cfg.batch_size, shift, gen)
        drop = draw_drop(cands, cfg.p, cfg.drop_mode, gen)
        if cfg.zero:  # every rank drew the same global batch: train on this rank's slice
            x0, cond, eps, s = zero.shard(x0, cond, eps, s)
        x0, cond, eps, s = to_device(dev, x0, cond, eps, s)
        if cfg.zero and cfg.precision == "bf16":
            cond = cond.map(lambda t: t.to(torch.bfloat16))
        x_s = flow.add_noise(x0, eps, s)
        with autocast(cfg.precision, dev, cfg.zero):
            with torch.set_grad_enabled(cfg.alpha < 1):  # alpha = 1: sg(v_full) needs no graph at all
                v_full = velocity(model, x_s, s, cond)
            with skipping(model, drop):
                v_drop = velocity(model, x_s, s, cond)
        loss, parts = stage2_loss(v_drop, v_full, x0, eps, cfg.alpha, loss_weight(model, s, cfg.min_sigma))
        if not (zero.all_finite(loss) if cfg.zero else torch.isfinite(loss)):
            raise FlgError(f"non-finite loss {loss.item()} at step {step}; the last good checkpoint is kept in "
                           f"{out}/checkpoints")
        if cfg.zero:  # the engine clips, steps the optimiser and the schedule
            engine.backward(loss)
            engine.step()
            gnorm = engine.get_global_grad_norm()
            loss_value = zero.mean_over_ranks(loss.item())
            parts = {k: zero.mean_over_ranks(v) for k, v in parts.items()}
        else:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step(); sched.step()
            loss_value = loss.item()
        step += 1
        if ema is not None:
            ema_update(ema, model, cfg.ema_decay, step)
        logs.append(dict(loss=loss_value, n_dropped=len(drop), **parts))
        bar.update(1); bar.set_postfix(loss=f"{loss_value:.4f}")
        if main and (step % cfg.log_every == 0 or step == cfg.steps):
            row = {k: float(np.mean([l[k] for l in logs if k in l])) for k in logs[-1]}
            append_jsonl(out / "log.jsonl", dict(step=step, grad_norm=float(gnorm), lr=sched.get_last_lr()[0],
                                                 sec_per_step=(time.time() - t0) / len(logs), **row))
            logs, t0 = [], time.time()
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            if cfg.zero:
                zero.save(out, step, {"model": engine}, {"noise": gen}, np_rng)
            else:
                save_train_state(out, step, model, opt, sched, {"noise": gen}, np_rng, ema)
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()

    final = model
    if cfg.zero:  # gather the partitioned weights; only rank 0 writes
        state = zero.gathered_state_dict(model)
        if not main:
            zero.barrier()
            return {}
        final = zero.unwrap_state(state, model)
    elif ema is not None:
        final.load_state_dict(ema)
    final = final.float().eval()
    meta = dict(bundle.meta, kind="stage2", drop=cands, keep=[b.index for b in blocks(model) if b.index not in cands],
                alpha=cfg.alpha, drop_mode=cfg.drop_mode, trained_steps=step)
    export_model(final, bundle.encoder, out / "model", meta)
    metrics = dict(steps=step, candidates=cands, final_loss=json.loads((out / "log.jsonl").read_text().splitlines()[-1])["loss"])
    write_json(out / "metrics.json", metrics)
    if cfg.zero:
        zero.barrier()
    return metrics
