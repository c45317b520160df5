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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import flow, synth, train, zero
from .config import FlgError, check_values
from .data import condition_source
from .models import cat_conds, export_model, family_of, flow_matching_loss, set_attention, to_device, velocity
from .runs import autocast, start_run, write_json
from .surgery import blocks, check_indices, complement, prune, retention_of, skipping
from .train import Runtime

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

    def __init__(self, shared, drop: list[int], fake: str, teacher: str, lora_rank: int, unpruned=None):
        self.shared, self.drop, self.mode, self.teacher = shared, list(drop), fake, teacher
        self.unpruned = unpruned  # Eq. 9's unpruned model, if not the shared weights' full view
        for p in () if unpruned is None else unpruned.parameters():
            p.requires_grad_(False)
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

    def fake_named(self) -> dict:
        """The fake DiT's trained parameters by name (not by requires_grad: peft switches the adapter's
        requires_grad off with the adapter)."""
        return {n: p for n, p in self.fake_model.named_parameters() if self.mode == "full" or "lora_" in n}

    def fake_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.fake_named().values())

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
        u = m if self.unpruned is None else self.unpruned
        v_uc = velocity(u, x, s, cond) if beta2 != 0 else v_pc  # beta2 = 0 needs no unpruned call
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
class Stage3Config(Runtime):  # + the runtime keys, for all three roles (zero: an engine each)
    model: str = "runs/stage2/model"  # a Stage-II model directory (its saved drop set is the student's cut)
    data: str = "synth"               # "synth" (SynthMotion) or a latent cache folder (`flg cache`): the conditions
    out: str = "runs/stage3"
    drop: list[int] | None = None     # None: the model's saved drop set; []: keep every block (plain DMD2)
    retention: float | None = None    # 1.0 is the same as drop=[]; other values must match the drop set
    teacher: str = "pruned"           # real and fake DiT from the pruned view (paper) or the "unpruned" one (Table 9)
    unpruned: str | None = None       # Eq. 9's unpruned model: None, the Stage-II weights' full view (paper); or a
                                      # model folder or name, e.g. the model before Stage II (a frozen target)
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
    check_values(cfg)  # ranges of steps, sizes, rates, seeds, sigmas; paths that must exist
    if cfg.teacher not in ("pruned", "unpruned"):
        raise FlgError(f"teacher must be 'pruned' or 'unpruned', got {cfg.teacher!r}")
    if cfg.fake not in ("lora", "full"):
        raise FlgError(f"fake must be 'lora' or 'full', got {cfg.fake!r}")
    train.check_runtime(cfg)
    if cfg.unpruned is not None and cfg.zero:
        raise FlgError("unpruned=<model> is not supported with zero=true (it would not be partitioned)")
    if cfg.fake_updates < 1:
        raise FlgError(f"fake_updates must be >= 1, got {cfg.fake_updates}")
    if not 0 < cfg.min_sigma < cfg.max_sigma <= 1:
        raise FlgError(f"need 0 < min_sigma < max_sigma <= 1, got {cfg.min_sigma}, {cfg.max_sigma}")
    if cfg.sigmas is not None and (not cfg.sigmas or any(not 0 < s <= 1 for s in cfg.sigmas)
                                   or list(cfg.sigmas) != sorted(cfg.sigmas, reverse=True)):
        raise FlgError(f"sigmas must be decreasing values in (0, 1], got {cfg.sigmas}")


def load_unpruned(cfg: Stage3Config, shared):
    """`unpruned=<model>`: that model, frozen, as Eq. 9's unpruned teacher (None: the shared weights' full view)."""
    if cfg.unpruned is None:
        return None
    from .sampling import load_bundle
    model = load_bundle(cfg.unpruned, device=next(shared.parameters()).device).model.float().eval()
    if type(model) is not type(shared) or len(blocks(model)) != len(blocks(shared)):
        raise FlgError(f"unpruned={cfg.unpruned}: not a model of the Stage-II model's class and depth "
                       f"({type(model).__name__}, {len(blocks(model))} blocks)")
    set_attention(model, cfg.attention)
    return model


def make_networks(cfg: Stage3Config, shared, drop: list[int], keep: list[int],
                  unpruned=None) -> tuple[torch.nn.Module, Critics]:
    """The student (a physically pruned copy of the kept blocks, trainable) and the critics over `shared`,
    prepared for the runtime settings (after the copies are made: copies come out uncompiled)."""
    torch.manual_seed(cfg.seed)  # the LoRA init draws from the global RNG: a run is a function of its seed
    student = prune(shared, keep).train()  # made before the adapter goes on
    student.flg_prediction = shared.flg_prediction
    for p in student.parameters():
        p.requires_grad_(True)
    critics = Critics(shared.eval(), drop, cfg.fake, cfg.teacher, cfg.lora_rank, unpruned)
    for m in {id(m): m for m in (student, shared, critics.fake_model)}.values():
        train.prepare(m, cfg)
    return student, critics


def run_stage3(cfg: Stage3Config) -> dict:
    from .sampling import load_bundle
    check_config(cfg)
    dev = train.start(cfg)
    main = zero.is_main()
    bundle = load_bundle(cfg.model, device="cpu" if cfg.zero else dev)
    shared, enc = bundle.model, bundle.encoder
    set_attention(shared, cfg.attention)  # before the student and any fake copy are made from it
    drop = resolve_drop(cfg, shared, bundle.meta)
    keep = complement(shared, drop)
    unpruned = load_unpruned(cfg, shared)
    out = Path(cfg.out)
    if (done := start_run(cfg, out, main)) is not None:
        return done
    shift = cfg.shift if cfg.shift is not None else bundle.meta.get("shift", 1.0)
    sigmas = list(cfg.sigmas) if cfg.sigmas else student_sigmas(cfg.student_steps, shift)

    student, critics = make_networks(cfg, shared, drop, keep, unpruned)
    common = dict(betas=(0.0, 0.999), weight_decay=0.0, warmup=cfg.warmup, grad_clip=cfg.grad_clip,
                  batch_size=cfg.batch_size)
    upd = train.Updater(student, dict(student.named_parameters()), cfg, lr=cfg.lr,
                        steps=cfg.steps // cfg.fake_updates + 1, **common)
    fake_upd = train.Updater(critics.fake_model, critics.fake_named(), cfg, lr=cfg.fake_lr, steps=cfg.steps, **common)
    if cfg.zero and cfg.fake == "full":  # the frozen real DiT is partitioned too, with no optimiser
        real_engine = zero.engine(shared, None, None, train.ds_config(cfg, cfg.batch_size))  # noqa: F841 (kept alive)
    gen = torch.Generator().manual_seed(cfg.seed)
    np_rng = np.random.default_rng(cfg.seed)
    updaters = {"student": upd, "fake": fake_upd}
    step, _ = train.resume(out, cfg, updaters, {"noise": gen}, np_rng)

    def randn(shape):  # drawn at the global batch size, then this rank's slice: N ranks follow 1 rank's stream
        return train.shard(cfg, torch.randn((cfg.batch_size, *shape[1:]), generator=gen))
    v_student = lambda x, s, c: velocity(student, x, s, c)
    amp = functools.partial(autocast, cfg.precision, dev, cfg.zero)  # every forward below; backward outside
    mean = functools.partial(train.mean_over_ranks, cfg)
    draw = condition_source(cfg.data, enc)

    bar = tqdm(total=cfg.steps, initial=step, desc="stage3", dynamic_ncols=True, disable=not main)
    log, memory = train.StepLog(out / "log.jsonl", cfg.log_every, cfg.steps, main), None
    while step < cfg.steps:
        # conditions: real first frames + full captions, as at inference (no word or caption dropout)
        x_ref, cond, null = draw(np_rng, cfg.batch_size)
        cond, null, noise = to_device(dev, *train.shard(cfg, cond, null), randn(x_ref.shape))
        k = int(torch.randint(len(sigmas), (1,), generator=gen))
        s_k = torch.full((noise.shape[0],), sigmas[k], device=dev)
        student_turn = step % cfg.fake_updates == 0
        row = dict(k=k)

        with amp(), torch.set_grad_enabled(student_turn):
            x_k = backward_simulate(lambda x, s: v_student(x, s, cond), noise, sigmas, k, randn)
            x = flow.x0_from_velocity(x_k, s_k, v_student(x_k, s_k, cond))
        if student_turn:  # DMD: move the student's samples along x0_fake - x0_real (Eq. 8)
            b1, b2 = draw_betas(cfg.beta1, cfg.beta2, cfg.beta1_range, cfg.beta2_range, gen)
            u = train.shard(cfg, torch.rand(cfg.batch_size, generator=gen))
            s = flow.shift_sigma(cfg.min_sigma + (cfg.max_sigma - cfg.min_sigma) * u, shift).float().to(dev)
            x_t = flow.add_noise(x.detach(), randn(x.shape).to(dev), s)
            with amp(), torch.no_grad():
                x0_real = flow.x0_from_velocity(x_t, s, critics.real_velocity(x_t, s, cond, null, b1, b2))
                x0_fake = flow.x0_from_velocity(x_t, s, critics.fake_velocity(x_t, s, cond))
            grad = dmd_grad(x.detach(), x0_real, x0_fake)
            loss = dmd_loss(x, grad)
            train.check_finite(loss, "student loss", step, out, cfg)
            upd.backward(loss)
            gnorm = upd.step()
            row.update(dmd_loss=mean(loss.item()), dmd_grad=mean(float(grad.abs().mean())), student_grad_norm=gnorm,
                       beta1=b1, beta2=b2)

        # fake DiT: flow matching on the student's (detached) outputs, the distribution it must track
        x = x.detach()
        s_f = train.shard(cfg, flow.sample_sigmas(cfg.batch_size, shift, gen)).to(dev)
        eps = randn(x.shape).to(dev)
        # backward inside the view: gradient checkpointing re-runs blocks, and must see the adapter switched on
        with critics.fake_view() as fake:
            with amp():
                fake_loss = flow_matching_loss(fake, x, eps, s_f, cond)
            train.check_finite(fake_loss, "fake-DiT loss", step, out, cfg)
            fake_upd.backward(fake_loss)
        fake_upd.step()
        step += 1
        if memory is None and not cfg.zero:  # optimiser states exist after the first step
            memory = state_bytes([shared, student, critics.fake_model], [upd.opt, fake_upd.opt])
        row["fake_loss"] = mean(fake_loss.item())
        log.add(step, row, lr=upd.lr())
        bar.update(1); bar.set_postfix(fake=f"{row['fake_loss']:.4f}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            train.save(out, step, cfg, updaters, {"noise": gen}, np_rng)
    bar.close()

    student = train.final_model(upd, cfg)
    if student is None:  # a ZeRO-3 rank other than 0: rank 0 writes
        zero.barrier()
        return {}
    meta = dict(bundle.meta, kind="student", sampler="fewstep", sigmas=sigmas, shift=shift, cfg_scale=1.0,
                diffusers_scheduler=sigmas == student_sigmas(len(sigmas), shift),
                steps=len(sigmas), keep=keep, teacher_blocks=len(blocks(shared)), trained_steps=step,
                stage3=dict(teacher=cfg.teacher, beta1=cfg.beta1, beta2=cfg.beta2, fake=cfg.fake,
                            unpruned=cfg.unpruned))
    meta.pop("drop", None)  # the student has no drop view: its blocks are all it has
    export_student(student.eval(), enc, out / "student", meta)
    if not cfg.zero:
        memory = memory or state_bytes([shared, student, critics.fake_model], [upd.opt, fake_upd.opt])
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
