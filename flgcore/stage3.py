"""Stage III (`flg stage3`): distribution matching with well-guided teacher guidance (paper Sec. 3.4, Eqs. 8-9).

Three networks, DMD2-style:
- real DiT: the frozen Stage-II weights, called as the drop view (pruned) and the full view (unpruned)
  and combined by Eq. 9 (`well_guided`); it never trains.
- student: a physically pruned copy of the drop view, a few-step generator (default 4 sigmas, no CFG),
  trained with backward simulation: its input at step k is made by running itself over steps 0..k-1.
- fake DiT: starts as the drop view and learns the student's output distribution by flow matching,
  `fake_updates` updates per student update. `fake: lora` puts a peft LoRA adapter on the frozen shared
  weights, so one copy of the big weights serves the weak teacher, the strong teacher and the fake DiT
  (the paper's parameter sharing); `fake: full` trains a separate copy (DMD2's way).

`teacher: unpruned` is the paper's Table 9 ablation (real and fake from the full view); `drop=[]` (or
`retention: 1.0`) with `beta2: 0` is plain DMD2, steps only (Table 2's baseline), from the same loop.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import flow, synth, zero
from .config import save_config
from .data import condition_source
from .models import cat_conds, check_attention, family_of, set_attention, to_device, velocity
from .config import FlgError
from .pretrain import export_model, pretrain_loss, sample_sigmas
from .runs import (autocast, check_precision, check_same_run, setup_torch, append_jsonl, finished, resume_train_state,
                   save_train_state, warmup_cosine, write_json)
from .surgery import (blocks, check_compile, check_indices, checkpoint_share, compile_blocks, complement, prune,
                      retention_of, set_checkpointing, skipping)

# ----------------------------------------------------------------------------- the math


def well_guided(v_pruned_cond: torch.Tensor, v_pruned_null: torch.Tensor, v_unpruned_cond: torch.Tensor,
                beta1: float, beta2: float) -> torch.Tensor:
    """Eq. 9, the well-guided teacher:

        v_real = beta1 (v_p(c) - v_p(0)) + beta2 (v_u(c) - v_p(c)) + v_p(0)

    beta1 is the inter CFG (text guidance of the pruned model), beta2 the intra CFG (how far toward the
    unpruned model). beta2 = 0 is plain CFG of the pruned model; beta1 = beta2 = 1 is the unpruned
    model's conditional velocity.
    """
    return beta1 * (v_pruned_cond - v_pruned_null) + beta2 * (v_unpruned_cond - v_pruned_cond) + v_pruned_null


def draw_betas(beta1: float, beta2: float, range1: float, range2: float, gen: torch.Generator) -> tuple[float, float]:
    """Eq. 9's jitter: beta1_cur ~ U[beta1 - range1, beta1 + range1], beta2_cur ~ U[beta2 - range2, beta2 + range2]
    (the paper's a1 = b1 = 1, a2 = b2 = 0.1), drawn once per student step."""
    u = torch.rand(2, generator=gen, dtype=torch.float64)
    return beta1 + range1 * (2 * float(u[0]) - 1), beta2 + range2 * (2 * float(u[1]) - 1)


def dmd_grad(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """The DMD gradient of Eq. 8 in x0 form, normalised per sample as in DMD2:

        grad = (x0_fake - x0_real) / mean |x - x0_real|

    x is the student's output, x0_real / x0_fake the real and fake DiTs' denoised estimates of its noised
    copy (sigma_t v_fake - sigma_t v_real = x0_real - x0_fake up to the sign the descent direction takes).
    """
    norm = (x - x0_real).abs().mean(dim=tuple(range(1, x.dim())), keepdim=True).clamp_min(1e-8)
    return (x0_fake - x0_real) / norm


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Surrogate whose gradient in x is the DMD gradient: 0.5 * mean (x - sg(x - grad))^2, so that
    d loss / d x = grad / x.numel() (DMD2's mean reduction)."""
    return 0.5 * (x.float() - (x - grad).detach().float()).pow(2).mean()


def student_scheduler(steps: int, shift: float):
    """The diffusers scheduler that samples the student: a FlowMatchLCMScheduler (its step is the student's:
    predict x0, re-noise to the next sigma) with the teacher's shift, stretched so that the last input sigma
    is shift(1 / steps), where DMD2's 999/749/499/249 spacing ends. Its `set_timesteps(steps)` gives the
    student's sigmas, so a diffusers pipeline reproduces the student from `num_inference_steps` alone."""
    from diffusers import FlowMatchLCMScheduler
    if steps < 1:
        raise FlgError(f"student_steps must be >= 1, got {steps}")
    terminal = float(flow.shift_sigma(1.0 / steps, shift)) if steps > 1 else None
    return FlowMatchLCMScheduler(shift=shift, shift_terminal=terminal)


def student_sigmas(steps: int, shift: float) -> list[float]:
    """The student's input sigmas, e.g. 4 steps at shift 2: [1, 0.880, 0.700, 0.4]."""
    sch = student_scheduler(steps, shift)
    sch.set_timesteps(steps)
    return [float(s) for s in sch.sigmas[:-1]]


def backward_simulate(v_student, noise: torch.Tensor, sigmas: list[float], k: int, draw) -> torch.Tensor:
    """The student's input at its k-th step, made by running the student itself over steps 0..k-1
    without gradient (DMD2's backward simulation), exactly as `flow.fewstep_sample` does at inference.
    `draw(shape)` makes the Gaussian draws."""
    if k == 0:
        return noise
    with torch.no_grad():
        x0 = flow.fewstep_sample(v_student, noise, sigmas[:k], draw=draw)
        eps = draw(noise.shape).to(noise.device)
        return flow.add_noise(x0, eps, torch.full((noise.shape[0],), sigmas[k], device=noise.device))


# ----------------------------------------------------------------------------- the three networks

def lora_targets(model) -> list[str]:
    """The fake DiT's LoRA sites: every linear layer inside the DiT blocks (self- and cross-attention, FFN;
    Wan I2V's image-key projections; HunyuanVideo's text-stream attention and its single blocks' fused MLP),
    and nothing else: not the adaLN modulation linears (`norm*.linear`), nor the embedders, HunyuanVideo's
    token refiner or the output head. Full names, because suffixes such as `net.2` or `proj_out` also name
    layers outside the blocks (Wan I2V's image embedder, the output head)."""
    names = []
    for _, attr, _ in family_of(model).groups:
        for i, blk in enumerate(getattr(model, attr)):
            names += [f"{attr}.{i}.{n}" for n, m in blk.named_modules()
                      if isinstance(m, torch.nn.Linear) and not n.startswith("norm")]
    return names


class Critics:
    """The real DiT (frozen, Eq. 9) and the fake DiT (trainable) over one shared frozen model.

    With `fake="lora"` the fake DiT is the shared model with its LoRA adapter switched on; the real DiT
    calls it with adapters off. With `fake="full"` the fake DiT is a separate trainable copy.
    """

    def __init__(self, shared, drop: list[int], fake: str, teacher: str, lora_rank: int):
        self.shared, self.drop, self.mode, self.teacher = shared, list(drop), fake, teacher
        for p in shared.parameters():
            p.requires_grad_(False)
        # the fake DiT starts from the view the real DiT is read from
        self.fake_drop = self.drop if teacher == "pruned" else []
        if fake == "lora":
            from peft import LoraConfig
            shared.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights=True,
                                          target_modules=lora_targets(shared)), adapter_name="fake")
            self.fake_model = shared
            self._adapter(False)  # B = 0 at init anyway: the fake DiT starts as its view exactly
        elif fake == "full":
            import copy
            self.fake_model = copy.deepcopy(shared)
            self.fake_model.flg_prediction = getattr(shared, "flg_prediction", "velocity")
            for p in self.fake_model.parameters():
                p.requires_grad_(True)
        else:
            raise FlgError(f"fake must be 'lora' or 'full', got {fake!r}")

    def _adapter(self, on: bool) -> None:
        """Switch the LoRA adapter on (fake DiT) or off (real DiT). peft also switches the adapter's
        requires_grad off, and autograd then drops gradients already on their way to it, so it is kept on."""
        self.shared.enable_adapters() if on else self.shared.disable_adapters()
        for p in self.fake_parameters():
            p.requires_grad_(True)

    def _fake_named(self):
        # by name, not requires_grad: peft switches the adapter's requires_grad off with the adapter
        return [(n, p) for n, p in self.fake_model.named_parameters() if self.mode == "full" or "lora_" in n]

    def fake_parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self._fake_named()]

    def fake_state(self) -> dict:
        return {n: p.detach().clone() for n, p in self._fake_named()}

    def load_fake_state(self, state: dict) -> None:
        missing = set(self.fake_state()) - set(state)
        if missing:
            raise FlgError(f"checkpoint lacks fake-DiT weights {sorted(missing)[:3]}... (fake mode changed?)")
        self.fake_model.load_state_dict(state, strict=False)

    @contextlib.contextmanager
    def fake_view(self):
        with contextlib.ExitStack() as stack:
            if self.mode == "lora":
                self._adapter(True)
                stack.callback(self._adapter, False)
            stack.enter_context(skipping(self.fake_model, self.fake_drop))
            yield self.fake_model

    def fake_velocity(self, x, s, cond):
        with self.fake_view() as m:
            return velocity(m, x, s, cond)

    @torch.no_grad()
    def real_velocity(self, x, s, cond, null, beta1: float, beta2: float) -> torch.Tensor:
        """Eq. 9 with the pruned view (teacher="pruned") or plain CFG of the full view (teacher="unpruned")."""
        m = self.shared
        xx, ss, cc = torch.cat([x, x]), torch.cat([s, s]), cat_conds([cond, null])
        if self.teacher == "unpruned":
            v_c, v_n = velocity(m, xx, ss, cc).chunk(2)
            return flow.cfg_combine(v_c, v_n, beta1)
        with skipping(m, self.drop):
            v_pc, v_pn = velocity(m, xx, ss, cc).chunk(2)
        v_uc = velocity(m, x, s, cond) if beta2 != 0 else v_pc  # beta2 = 0 needs no unpruned call
        return well_guided(v_pc, v_pn, v_uc, beta1, beta2)


def state_bytes(modules: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict:
    """Parameter and optimiser-state memory, each tensor counted once (shared weights are one copy)."""
    seen, params, grads_opt = set(), 0, 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params += p.numel() * p.element_size()
    trainable = sum(p.numel() * p.element_size() for o in optimizers for g in o.param_groups for p in g["params"])
    for o in optimizers:
        for st in o.state.values():
            grads_opt += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    return dict(param_bytes=params, trainable_bytes=trainable, optimizer_bytes=grads_opt,
                grad_bytes=trainable, total_bytes=params + grads_opt + trainable)


# ----------------------------------------------------------------------------- the stage


@dataclass
class Stage3Config:
    model: str = "runs/stage2/model"  # a Stage-II model directory (its saved drop set is the student's cut)
    data: str = "synth"               # "synth" (SynthMotion) or a latent cache folder (`flg cache`): the conditions
    out: str = "runs/stage3"
    drop: list[int] | None = None     # None: the model's saved drop set; []: keep every block (plain DMD2)
    retention: float | None = None    # 1.0 is the same as drop=[]; other values must match the drop set
    teacher: str = "pruned"           # real and fake DiT from the pruned view (paper) or the "unpruned" one (Table 9)
    beta1: float = 3.5                # inter CFG (Wan 3.5, HunyuanVideo 2.0)
    beta2: float = 0.25               # intra CFG
    beta1_range: float = 1.0          # jitter: beta1 ~ U[beta1 - r, beta1 + r]
    beta2_range: float = 0.1
    student_steps: int = 4
    sigmas: list[float] | None = None  # the student's input sigmas; None: `student_steps` points of the shifted grid
    fake: str = "lora"                # "lora" (shared frozen weights + adapter) or "full" (a trainable copy)
    lora_rank: int = 16
    fake_updates: int = 5             # fake-DiT updates per student update (DMD2's two time-scale rule)
    steps: int = 500                  # iterations; each updates the fake DiT, every `fake_updates`-th the student
    batch_size: int = 16
    lr: float = 2e-5                  # student
    fake_lr: float = 2e-4
    warmup: int = 10
    grad_clip: float = 1.0
    min_sigma: float = 0.02           # DMD noise levels: s ~ shift(U[min_sigma, max_sigma])
    max_sigma: float = 0.98
    shift: float | None = None        # None: the model's saved shift
    seed: int = 0
    ckpt_every: int = 50
    log_every: int = 10
    threads: int = 0
    device: str = "cpu"              # "cuda": train on a GPU (data and noise are still drawn on the CPU)
    zero: bool = False               # DeepSpeed ZeRO-3: engines for the student and the fake DiT (batch_size is global)
    offload: bool = False            # zero=true: optimiser states and parameters offloaded to CPU memory
    precision: str = "fp32"          # fp32 or bf16: autocast over fp32 master weights (zero=true: DeepSpeed's bf16)
    grad_checkpointing: bool | float = False  # student and fake DiT: true = every block, 0.5 = every other
    attention: str = "native"        # diffusers attention backend for all three roles (models.set_attention)
    compile: bool = False            # torch.compile each block of every role in place (surgery.compile_blocks)


def resolve_drop(cfg: Stage3Config, model, meta: dict) -> list[int]:
    if cfg.drop is not None and cfg.retention is not None and cfg.retention != 1.0:
        raise FlgError("give drop or retention, not both")
    if cfg.retention == 1.0:
        return []
    if cfg.drop is not None:
        drop = check_indices(model, cfg.drop, "dropped block index")
    elif "drop" in meta:
        drop = check_indices(model, meta["drop"], "saved drop block index")
    else:
        raise FlgError(f"{cfg.model} has no saved drop set: give a Stage-II model, drop=[...], or retention=1.0")
    if cfg.retention is not None:
        got = retention_of(model, complement(model, drop))
        if abs(got - cfg.retention) > 0.02:
            raise FlgError(f"retention {cfg.retention} does not match the drop set {drop} ({got:.3f} of block "
                           f"parameters kept); run Stage I/II for that retention")
    return drop


def check_config(cfg: Stage3Config) -> None:
    if cfg.teacher not in ("pruned", "unpruned"):
        raise FlgError(f"teacher must be 'pruned' or 'unpruned', got {cfg.teacher!r}")
    if cfg.fake not in ("lora", "full"):
        raise FlgError(f"fake must be 'lora' or 'full', got {cfg.fake!r}")
    checkpoint_share(cfg.grad_checkpointing)
    check_attention(cfg.attention)
    check_compile(cfg.compile, cfg.zero)
    check_precision(cfg.precision)
    if cfg.fake_updates < 1:
        raise FlgError(f"fake_updates must be >= 1, got {cfg.fake_updates}")
    if not 0 < cfg.min_sigma < cfg.max_sigma <= 1:
        raise FlgError(f"need 0 < min_sigma < max_sigma <= 1, got {cfg.min_sigma}, {cfg.max_sigma}")
    if cfg.sigmas is not None and (not cfg.sigmas or any(not 0 < s <= 1 for s in cfg.sigmas)
                                   or list(cfg.sigmas) != sorted(cfg.sigmas, reverse=True)):
        raise FlgError(f"sigmas must be decreasing values in (0, 1], got {cfg.sigmas}")


def run_stage3(cfg: Stage3Config) -> dict:
    from .sampling import load_bundle
    setup_torch(cfg.threads, cfg.device)
    check_config(cfg)
    dev = zero.init(cfg.device) if cfg.zero else cfg.device
    main = zero.is_main()
    bundle = load_bundle(cfg.model, device="cpu" if cfg.zero else dev)
    shared, enc = bundle.model, bundle.encoder
    set_attention(shared, cfg.attention)  # before the student and any fake copy are made from it
    drop = resolve_drop(cfg, shared, bundle.meta)
    keep = complement(shared, drop)
    out = Path(cfg.out)
    check_same_run(cfg, out)
    if (done := finished(out, "student", cfg.steps)) is not None:
        return done
    if main:
        save_config(cfg, out)
    shift = cfg.shift if cfg.shift is not None else bundle.meta.get("shift", 1.0)
    sigmas = list(cfg.sigmas) if cfg.sigmas else student_sigmas(cfg.student_steps, shift)

    torch.manual_seed(cfg.seed)  # the LoRA init draws from the global RNG: a run is a function of its seed
    student = prune(shared, keep).train()  # physically pruned copy, made before the adapter goes on
    student.flg_prediction = shared.flg_prediction
    for p in student.parameters():
        p.requires_grad_(True)
    critics = Critics(shared.eval(), drop, cfg.fake, cfg.teacher, cfg.lora_rank)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.0, 0.999))
    sched = warmup_cosine(opt, cfg.warmup, cfg.steps // cfg.fake_updates + 1)
    fake_opt = torch.optim.AdamW(critics.fake_parameters(), lr=cfg.fake_lr, weight_decay=0.0, betas=(0.0, 0.999))
    fake_sched = warmup_cosine(fake_opt, cfg.warmup, cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    np_rng = np.random.default_rng(cfg.seed)
    set_checkpointing(student, cfg.grad_checkpointing); set_checkpointing(critics.fake_model, cfg.grad_checkpointing)
    if cfg.compile:  # after prune, the fake copy and the adapter: copies come out uncompiled
        for m in {id(m): m for m in (student, shared, critics.fake_model)}.values():
            compile_blocks(m)
    if cfg.zero:
        ds = zero.ds_config(cfg.batch_size, cfg.grad_clip, cfg.precision == "bf16", cfg.offload)
        engines = {"student": zero.engine(student, opt, sched, ds),
                   "fake": zero.engine(critics.fake_model, fake_opt, fake_sched, ds)}
        if cfg.fake == "full":  # the frozen real DiT: partitioned too, with no optimiser
            engines["real"] = zero.engine(shared, None, None, ds)
        trained = {k: engines[k] for k in ("student", "fake")}  # the frozen real engine is not checkpointed
        step, _ = zero.resume(out, trained, {"noise": gen}, np_rng)
    else:
        step, st = resume_train_state(out, student, opt, sched, {"noise": gen}, np_rng)
        if st:
            critics.load_fake_state(st["fake"])
            fake_opt.load_state_dict(st["fake_opt"])
            fake_sched.load_state_dict(st["fake_sched"])
    shard = zero.shard if cfg.zero else (lambda *xs: xs[0] if len(xs) == 1 else xs)

    def randn(shape):  # drawn at the global batch size, then this rank's slice: N ranks follow 1 rank's stream
        return shard(torch.randn((cfg.batch_size, *shape[1:]), generator=gen))
    kill_at = int(os.environ.get("FLG_TEST_KILL_AT_STEP", "0"))  # tests: SIGKILL ourselves mid-run
    v_student = lambda x, s, c: velocity(student, x, s, c)
    amp = functools.partial(autocast, cfg.precision, dev, cfg.zero)  # every forward below; backward outside
    draw = condition_source(cfg.data, enc)

    bar = tqdm(total=cfg.steps, initial=step, desc="stage3", dynamic_ncols=True, disable=not main)
    logs, t0, memory = [], time.time(), None
    while step < cfg.steps:
        # conditions: real first frames + full captions, as at inference (no word or caption dropout)
        x_ref, cond, null = draw(np_rng, cfg.batch_size)
        cond, null, noise = to_device(dev, *shard(cond, null), randn(x_ref.shape))
        k = int(torch.randint(len(sigmas), (1,), generator=gen))
        s_k = torch.full((noise.shape[0],), sigmas[k], device=dev)
        student_turn = step % cfg.fake_updates == 0
        row = dict(k=k)

        with amp(), torch.set_grad_enabled(student_turn):
            x_k = backward_simulate(lambda x, s: v_student(x, s, cond), noise, sigmas, k, randn)
            x = flow.x0_from_velocity(x_k, s_k, v_student(x_k, s_k, cond))
        if student_turn:  # DMD: move the student's samples along x0_fake - x0_real (Eq. 8)
            b1, b2 = draw_betas(cfg.beta1, cfg.beta2, cfg.beta1_range, cfg.beta2_range, gen)
            s = flow.shift_sigma(cfg.min_sigma + (cfg.max_sigma - cfg.min_sigma) * shard(torch.rand(cfg.batch_size, generator=gen)),
                                 shift).float().to(dev)
            x_t = flow.add_noise(x.detach(), randn(x.shape).to(dev), s)
            with amp(), torch.no_grad():
                x0_real = flow.x0_from_velocity(x_t, s, critics.real_velocity(x_t, s, cond, null, b1, b2))
                x0_fake = flow.x0_from_velocity(x_t, s, critics.fake_velocity(x_t, s, cond))
            grad = dmd_grad(x.detach(), x0_real, x0_fake)
            loss = dmd_loss(x, grad)
            if not (zero.all_finite(loss) if cfg.zero else torch.isfinite(loss)):
                raise FlgError(f"non-finite student loss {loss.item()} at step {step}; the last good checkpoint is "
                               f"kept in {out}/checkpoints")
            if cfg.zero:
                engines["student"].backward(loss); engines["student"].step()
                gnorm = engines["student"].get_global_grad_norm()
            else:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
                opt.step(); sched.step()
            mean = zero.mean_over_ranks if cfg.zero else float
            row.update(dmd_loss=mean(loss.item()), dmd_grad=mean(float(grad.abs().mean())),
                       student_grad_norm=float(gnorm), beta1=b1, beta2=b2)

        # fake DiT: flow matching on the student's (detached) outputs, the distribution it must track
        x = x.detach()
        s_f = shard(sample_sigmas(cfg.batch_size, shift, gen)).to(dev)
        eps = randn(x.shape).to(dev)
        # backward inside the view: gradient checkpointing re-runs blocks, and must see the adapter switched on
        with critics.fake_view() as fake:
            with amp():
                fake_loss = pretrain_loss(fake, x, eps, s_f, cond)
            if not (zero.all_finite(fake_loss) if cfg.zero else torch.isfinite(fake_loss)):
                raise FlgError(f"non-finite fake-DiT loss {fake_loss.item()} at step {step}; the last good checkpoint "
                               f"is kept in {out}/checkpoints")
            if cfg.zero:
                engines["fake"].backward(fake_loss)
            else:
                fake_opt.zero_grad(set_to_none=True)
                fake_loss.backward()
        if cfg.zero:
            engines["fake"].step()
        else:
            torch.nn.utils.clip_grad_norm_(critics.fake_parameters(), cfg.grad_clip)
            fake_opt.step(); fake_sched.step()
        step += 1
        if memory is None and not cfg.zero:  # optimiser states exist after the first step
            memory = state_bytes([shared, student, critics.fake_model], [opt, fake_opt])
        row["fake_loss"] = zero.mean_over_ranks(fake_loss.item()) if cfg.zero else fake_loss.item()
        logs.append(row)
        bar.update(1); bar.set_postfix(fake=f"{row['fake_loss']:.4f}")
        if main and (step % cfg.log_every == 0 or step == cfg.steps):
            keys = {k for r in logs for k in r}
            mean = {k: float(np.mean([r[k] for r in logs if k in r])) for k in sorted(keys)}
            append_jsonl(out / "log.jsonl", dict(step=step, lr=sched.get_last_lr()[0],
                                                 sec_per_step=(time.time() - t0) / len(logs), **mean))
            logs, t0 = [], time.time()
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            if cfg.zero:
                zero.save(out, step, trained, {"noise": gen}, np_rng)
            else:
                save_train_state(out, step, student, opt, sched, {"noise": gen}, np_rng, fake=critics.fake_state(),
                                 fake_opt=fake_opt.state_dict(), fake_sched=fake_sched.state_dict())
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()

    if cfg.zero:  # gather the student's partitioned weights; only rank 0 writes
        state = zero.gathered_state_dict(student)
        if not main:
            zero.barrier()
            return {}
        student = zero.unwrap_state(state, student)
    meta = dict(bundle.meta, kind="student", sampler="fewstep", sigmas=sigmas, shift=shift, cfg_scale=1.0,
                diffusers_scheduler=sigmas == student_sigmas(len(sigmas), shift),
                steps=len(sigmas), keep=keep, teacher_blocks=len(blocks(shared)), trained_steps=step,
                stage3=dict(teacher=cfg.teacher, beta1=cfg.beta1, beta2=cfg.beta2, fake=cfg.fake))
    meta.pop("drop", None)  # the student has no drop view: its blocks are all it has
    export_student(student.eval(), enc, out / "student", meta)
    if not cfg.zero:
        memory = memory or state_bytes([shared, student, critics.fake_model], [opt, fake_opt])
    metrics = dict(steps=step, keep=keep, drop=drop, sigmas=sigmas, fake=cfg.fake, teacher=cfg.teacher,
                   retention=retention_of(shared, keep), memory=memory, processes=zero.world()[1])
    write_json(out / "metrics.json", metrics)
    if cfg.zero:
        zero.barrier()
    return metrics


def export_student(student, encoder: synth.TextEncoder, out: Path, meta: dict) -> Path:
    """A diffusers model directory of the teacher's class with fewer blocks, plus its schedule:
    flgcore.json (sigmas, shift) and scheduler/ (`student_scheduler`), so that `flg sample --model <dir>`
    and a diffusers pipeline given `transformer=` and `scheduler=` from this folder and
    `num_inference_steps=len(sigmas)` need nothing else (custom `sigmas` need the pipeline's `sigmas=`)."""
    export_model(student, encoder, out, meta)
    student_scheduler(len(meta["sigmas"]), meta["shift"]).save_pretrained(out / "scheduler")
    return out
