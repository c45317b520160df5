"""What Stages II and III share for training: the runtime settings, one optimiser step for plain PyTorch and
DeepSpeed ZeRO-3, checkpoints of every trained network with the random streams, and the step log.

A stage makes one `Updater` per trained network and calls `backward(loss)` and `step()` on it the same way
whether a plain AdamW or a ZeRO-3 engine does the work (the engine then owns the partitioned model, the
optimiser and the schedule); `save` and `resume` checkpoint all of a stage's updaters at once: one atomic
torch.save'd dict (runs.save_checkpoint), or DeepSpeed's partitioned checkpoints (zero.save).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import zero
from .config import FlgError
from .models import check_attention, to_device
from .runs import append_jsonl, check_precision, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, \
    set_rng_state, setup_torch, warmup_cosine
from .surgery import check_compile, checkpoint_share, compile_blocks, set_checkpointing


@dataclass
class Runtime:
    """How a stage runs, not what it computes. The stage configs inherit these keys (`threads=2`, `zero=true`)."""
    threads: int = 0                 # torch CPU threads (0: torch's default)
    device: str = "cpu"              # "cuda": train on a GPU (data and noise are still drawn on the CPU)
    precision: str = "fp32"          # fp32 or bf16: autocast over fp32 master weights (zero=true: DeepSpeed's bf16)
    zero: bool = False               # DeepSpeed ZeRO-3 across the launcher's processes (batch_size is global)
    offload: bool = False            # zero=true: optimiser states and parameters offloaded to CPU memory
    grad_checkpointing: bool | float = False  # recompute activations in backward: true = every block, 0.5 = every other
    attention: str = "native"        # diffusers attention backend; "_native_cudnn" is faster on H100 (models.set_attention)
    compile: bool = False            # torch.compile each block in place (surgery.compile_blocks): a GPU speed lever


def check_runtime(rt: Runtime) -> None:
    check_precision(rt.precision)
    checkpoint_share(rt.grad_checkpointing)
    check_attention(rt.attention)
    check_compile(rt.compile, rt.zero)


def start(rt: Runtime) -> str:
    """Set torch up and (zero=true) join the process group: this process's device. (Check the settings first:
    `check_runtime`, from the stage's own check.)"""
    setup_torch(rt.threads, rt.device)
    return zero.init(rt.device) if rt.zero else rt.device


def prepare(model, rt: Runtime) -> None:
    """Gradient checkpointing and regional compilation, as the runtime settings ask."""
    set_checkpointing(model, rt.grad_checkpointing)
    if rt.compile:
        compile_blocks(model)


def shard(rt: Runtime, *xs):
    """This process's slice of batch-first tensors (or Conds) drawn at the global batch size: every ZeRO-3
    rank draws the same global batch, so N ranks follow one rank's random stream."""
    if rt.zero:
        return zero.shard(*xs)
    return xs[0] if len(xs) == 1 else xs


def local_batch(rt: Runtime, device: str, *xs):
    return to_device(device, *shard(rt, *xs))


def mean_over_ranks(rt: Runtime, x: float) -> float:
    return zero.mean_over_ranks(x) if rt.zero else float(x)


def check_finite(loss: torch.Tensor, what: str, step: int, out: Path, rt: Runtime) -> None:
    """Stop (all ranks together) on a non-finite loss, before it reaches the weights."""
    if not (zero.all_finite(loss) if rt.zero else torch.isfinite(loss)):
        raise FlgError(f"non-finite {what} {loss.item()} at step {step}; the last good checkpoint is kept in "
                       f"{out}/checkpoints")


class Updater:
    """AdamW with a warm-up cosine schedule over the parameters `named` (name -> parameter) of `model`.

    Plain PyTorch: zero_grad + backward, then clip, optimiser step, schedule step. ZeRO-3: a DeepSpeed engine
    over `model` with the same optimiser and schedule does all of that (and the clipping) itself.
    """

    def __init__(self, model, named: dict, rt: Runtime, *, lr: float, betas: tuple[float, float],
                 weight_decay: float, warmup: int, steps: int, grad_clip: float, batch_size: int):
        self.named, self.grad_clip = dict(named), grad_clip
        self.params = list(self.named.values())
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, betas=betas)
        self.sched = warmup_cosine(self.opt, warmup, steps)
        self.engine = zero.engine(model, self.opt, self.sched, ds_config(rt, batch_size, grad_clip)) if rt.zero else None
        self.model = self.engine.module if self.engine is not None else model

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss)
            return
        self.opt.zero_grad(set_to_none=True)
        loss.backward()

    def step(self) -> float:
        """One optimiser and schedule step; returns the gradient norm before clipping."""
        if self.engine is not None:
            self.engine.step()
            return float(self.engine.get_global_grad_norm())
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.sched.step()
        return float(gnorm)

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def state_dict(self) -> dict:  # plain PyTorch only: an engine checkpoints itself
        # no copies: `save` writes the checkpoint at once, and a copy would double the weights' memory meanwhile
        return dict(weights={n: p.detach() for n, p in self.named.items()}, opt=self.opt.state_dict(),
                    sched=self.sched.state_dict())

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.named) - set(state["weights"]))
        if missing:
            raise FlgError(f"the checkpoint lacks trained weights {missing[:3]}... (was the run made with another "
                           "network layout, e.g. another fake mode?)")
        with torch.no_grad():
            for n, p in self.named.items():
                p.copy_(state["weights"][n])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])


def ds_config(rt: Runtime, batch_size: int, grad_clip: float = 1.0) -> dict:
    return zero.ds_config(batch_size, grad_clip, rt.precision == "bf16", rt.offload)


def save(out: Path, step: int, rt: Runtime, updaters: dict[str, Updater], gens: dict[str, torch.Generator], np_rng,
         **extra) -> Path:
    """Checkpoint every updater, `extra` (plain PyTorch: e.g. the EMA weights) and every RNG: what a
    bit-identical resume needs."""
    if rt.zero:
        return zero.save(out, step, {k: u.engine for k, u in updaters.items()}, gens, np_rng)
    state = dict(step=step, np_rng=np_rng.bit_generator.state, rng=rng_state(gens), **extra)
    state.update({k: u.state_dict() for k, u in updaters.items()})
    return save_checkpoint(out, step, state)


def resume(out: Path, rt: Runtime, updaters: dict[str, Updater], gens: dict[str, torch.Generator],
           np_rng) -> tuple[int, dict]:
    """Load the newest checkpoint into the updaters and the RNGs: (its step, the checkpoint), or (0, {})."""
    if rt.zero:
        return zero.resume(out, {k: u.engine for k, u in updaters.items()}, gens, np_rng)
    ck = latest_checkpoint(out)
    if ck is None:
        return 0, {}
    st = load_checkpoint(ck)
    for k, u in updaters.items():
        u.load_state_dict(st[k])
    np_rng.bit_generator.state = st["np_rng"]
    set_rng_state(st["rng"], gens)
    print(f"resuming {out} from step {st['step']}")
    return st["step"], st


def final_model(upd: Updater, rt: Runtime):
    """The trained model to export: as it is, or (ZeRO-3) its weights gathered into a plain copy on rank 0
    (None on the other ranks). Collective under ZeRO-3: every rank calls it."""
    if not rt.zero:
        return upd.model
    state = zero.gathered_state_dict(upd.model)
    return zero.unwrap_state(state, upd.model) if zero.is_main() else None


class StepLog:
    """The rows of the last `every` steps, averaged into one line of log.jsonl (on the main process)."""

    def __init__(self, path: Path, every: int, last: int, main: bool):
        self.path, self.every, self.last, self.main = path, every, last, main
        self.rows, self.t0 = [], time.time()

    def add(self, step: int, row: dict, **latest) -> None:
        """`row` is averaged with the other steps' rows; `latest` (learning rate, grad norm) is logged as it is."""
        if not self.main:
            return
        self.rows.append(row)
        if step % self.every == 0 or step == self.last:
            keys = sorted({k for r in self.rows for k in r})
            mean = {k: float(np.mean([r[k] for r in self.rows if k in r])) for k in keys}
            append_jsonl(self.path, dict(step=step, **latest, sec_per_step=(time.time() - self.t0) / len(self.rows),
                                         **mean))
            self.rows, self.t0 = [], time.time()
