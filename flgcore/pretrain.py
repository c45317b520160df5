"""`flg pretrain`: train the tiny teacher (a real diffusers WanTransformer3DModel) on SynthMotion.

Plain flow matching (v-target, eps - x0) with Wan-I2V-style conditioning: the noisy clip, a
first-frame mask and the first frame are concatenated on channels; the caption goes through
cross-attention. The caption is dropped for `cond_dropout` of the samples so that the model also
learns the null condition used by CFG. Batch i (clips, caption dropout, noise, sigmas) is a pure function of
(seed, i), so DataLoader workers can render ahead and a restarted run continues from its last checkpoint
(model, EMA, optimizer, scheduler, step) with exactly the batches it would have seen.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import flow, synth
from .config import check_values
from .models import export_model, flow_matching_loss, to_device
from .config import FlgError
from .runs import (start_run, setup_torch, append_jsonl, ema_update, latest_checkpoint, load_checkpoint,
                   resume_train_state, save_train_state, warmup_cosine, write_json)


@dataclass
class TeacherArch:
    """The tiny teacher: 16 blocks x width 96 over 8x32x32 RGB clips (patch 2x4x4 -> 256 tokens)."""
    num_layers: int = 16
    num_attention_heads: int = 4
    attention_head_dim: int = 24
    ffn_dim: int = 384
    text_dim: int = 32
    freq_dim: int = 64
    patch_size: tuple[int, ...] = (2, 4, 4)


@dataclass
class PretrainConfig:
    out: str = "runs/pretrain"
    arch: TeacherArch = field(default_factory=TeacherArch)
    steps: int = 3000
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    cond_dropout: float = 0.1   # share of samples trained with the empty caption (for CFG)
    shift: float = 2.0          # timestep shift used in training and saved for sampling
    ema_decay: float = 0.999
    seed: int = 0
    ckpt_every: int = 100
    log_every: int = 10
    threads: int = 0            # torch CPU threads (0: torch's default)
    device: str = "cpu"         # "cuda" trains the same run on a GPU (data is still drawn on the CPU)
    workers: int = 0            # DataLoader processes rendering SynthMotion batches ahead (a GPU outpaces one core)
    sample_steps: int = 50      # sampling defaults saved with the model
    sample_cfg: float = 4.0
    # "x0" (JiT-style x-prediction, trained with a v-loss whose 1/s is clamped at `min_sigma`) or "velocity".
    # Pixel-space tokens of 2x4x4 RGB carry 96 noisy values into a 96-wide stream: a v-predicting network
    # must carry the noise through to cancel it and cannot, which left visible noise in every sample (LOG.md).
    prediction: str = "x0"
    min_sigma: float = 0.05
    init_from: str | None = None  # warm start: a model directory (e.g. synth-tiny) whose weights start the run
    # torch.compile the model in place (the class stays a diffusers model): ~1.2x per step on the 2-core CPU
    # (2.5-2.8 s against 3.3 s at batch 32), after a one-off compile of ~3 min per (re)start (LOG.md).
    compile: bool = False


def build_teacher(arch: TeacherArch, seed: int = 0):
    import diffusers
    torch.manual_seed(seed)
    c = 3  # RGB "latents": the testbed has no VAE
    return diffusers.WanTransformer3DModel(
        patch_size=tuple(arch.patch_size), num_attention_heads=arch.num_attention_heads,
        attention_head_dim=arch.attention_head_dim, in_channels=c + 1 + c, out_channels=c,
        text_dim=arch.text_dim, freq_dim=arch.freq_dim, ffn_dim=arch.ffn_dim, num_layers=arch.num_layers,
        rope_max_seq_len=64)


class TrainBatches(torch.utils.data.Dataset):
    """Batch i = (x0, cond, eps, s), a pure function of (seed, i)."""

    def __init__(self, encoder: synth.TextEncoder, seed: int, batch_size: int, cond_dropout: float, shift: float):
        self.encoder, self.seed, self.batch_size, self.cond_dropout, self.shift = encoder, seed, batch_size, cond_dropout, shift

    def __len__(self) -> int:
        return 2 ** 31

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, i])
        gen = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        x0, cond = synth.train_batch(self.encoder, rng, gen, self.batch_size, self.cond_dropout)
        return x0, cond, torch.randn(x0.shape, generator=gen), flow.sample_sigmas(self.batch_size, self.shift, gen)


def run_pretrain(cfg: PretrainConfig) -> dict:
    check_values(cfg)
    setup_torch(cfg.threads, cfg.device)
    out = Path(cfg.out)
    if cfg.prediction not in ("x0", "velocity"):
        raise FlgError(f"prediction must be 'x0' or 'velocity', got {cfg.prediction!r}")
    model = build_teacher(cfg.arch, cfg.seed).train()
    model.flg_prediction = cfg.prediction
    if cfg.init_from:  # before the run folder is made: weights of another shape leave nothing behind
        from .models import load_transformer
        try:
            model.load_state_dict(load_transformer(cfg.init_from).state_dict())
        except RuntimeError as e:  # load_state_dict's report: a header line, then one line per mismatch
            first = next((l.strip() for l in str(e).splitlines()[1:] if l.strip()), str(e))
            raise FlgError(f"init_from={cfg.init_from}: its weights do not fit arch ({first[:200]})") from None
    if (done := start_run(cfg, out)) is not None:
        return done
    model.to(cfg.device)
    if cfg.compile:
        model.compile()
    encoder = synth.TextEncoder.create(dim=cfg.arch.text_dim)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    sched = warmup_cosine(opt, cfg.warmup, cfg.steps)
    step, st = resume_train_state(out, model, opt, sched, {}, np.random.default_rng(0))
    ema = {k: v.to(cfg.device) for k, v in st.get("ema", ema).items()}

    if cfg.steps == 0 and step == 0:  # steps=0 exports the untrained init (a baseline for the metrics)
        save_train_state(out, 0, model, opt, sched, {}, np.random.default_rng(0), ema)
    batches = torch.utils.data.DataLoader(
        TrainBatches(encoder, cfg.seed, cfg.batch_size, cfg.cond_dropout, cfg.shift), batch_size=None,
        sampler=range(step, cfg.steps), num_workers=cfg.workers, prefetch_factor=4 if cfg.workers else None)
    bar = tqdm(total=cfg.steps, initial=step, desc="pretrain", dynamic_ncols=True)
    losses, t0 = [], time.time()
    for x0, cond, eps, s in batches:
        x0, cond, eps, s = to_device(cfg.device, x0, cond, eps, s)
        loss = flow_matching_loss(model, x0, eps, s, cond, cfg.min_sigma)
        if not torch.isfinite(loss):
            raise FlgError(f"non-finite loss {loss.item()} at step {step}; last good checkpoint kept in {out}/checkpoints")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step(); sched.step(); step += 1
        ema_update(ema, model, cfg.ema_decay, step)
        losses.append(loss.item())
        bar.update(1); bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            append_jsonl(out / "log.jsonl", dict(step=step, loss=float(np.mean(losses)), grad_norm=float(gnorm),
                                                 lr=sched.get_last_lr()[0], sec_per_step=(time.time() - t0) / len(losses)))
            losses, t0 = [], time.time()
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_train_state(out, step, model, opt, sched, {}, np.random.default_rng(0), ema)
    bar.close()
    return export_checkpoint(cfg)


def _steps_before(init_from: str | None) -> int:
    """Training steps already in a warm start's weights (its flgcore.json), 0 without one."""
    if not init_from:
        return 0
    from .sampling import model_root
    try:
        return int(json.loads((model_root(init_from) / "flgcore.json").read_text()).get("trained_steps", 0))
    except FlgError:  # a plain diffusers checkpoint: no count to carry
        return 0


def export_checkpoint(cfg: PretrainConfig, dest: str | Path | None = None) -> dict:
    """Export the EMA weights of the run's latest checkpoint as a model directory (default <out>/model)."""
    out = Path(cfg.out)
    ck = latest_checkpoint(out)
    if ck is None:
        raise FlgError(f"{out}: no checkpoint to export")
    st = load_checkpoint(ck)
    model = build_teacher(cfg.arch, cfg.seed)
    model.load_state_dict(st["ema"])
    meta = dict(family="wan", kind="teacher", prediction=cfg.prediction, shift=cfg.shift, sampler="euler", steps=cfg.sample_steps,
                cfg_scale=cfg.sample_cfg, frames=synth.FRAMES, size=synth.SIZE, channels=3,
                trained_steps=_steps_before(cfg.init_from) + st["step"])  # counted over warm starts too
    dest = Path(dest) if dest else out / "model"
    export_model(model.eval(), synth.TextEncoder.create(dim=cfg.arch.text_dim), dest, meta)
    log = []
    if (out / "log.jsonl").exists():
        log = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["step"] <= st["step"]]
    metrics = dict(steps=st["step"], final_loss=log[-1]["loss"] if log else None, model=str(dest))
    write_json(out / "metrics.json", metrics)
    return metrics
