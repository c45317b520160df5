"""DeepSpeed ZeRO-3 for Stages II and III: engines, sharded batches, atomic checkpoints, gathered export.

Launch a stage with `torchrun --nproc_per_node N -m flgcore.cli stage2 ... zero=true` (or the `deepspeed`
launcher). Every rank draws the same global batch from the same seeded generators and trains on its own
slice, so N processes follow the single-process run (up to reduction order) and the random stream does
not depend on N. On a CPU (tests, CI) DeepSpeed runs with `DS_ACCELERATOR=cpu` and gloo.

Checkpoints (DeepSpeed writes into the final folder in place and keeps no RNG state): every
engine saves into `checkpoints/.tmp_step_XXXXXXXX/<engine>/`, every rank writes its RNG state beside them,
and rank 0 renames the folder to `step_XXXXXXXX` once all ranks are done; older steps are deleted only
after that. Export gathers the full weights first (`save_pretrained` on a partitioned model writes empty
tensors) and refuses to write a model with an empty tensor.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .models import Cond
from .config import FlgError


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (1 process: 0, 1, 0)."""
    e = os.environ
    return int(e.get("RANK", 0)), int(e.get("WORLD_SIZE", 1)), int(e.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return world()[0] == 0


def init(device: str) -> str:
    """Start the process group; returns this rank's device ("cpu" or "cuda:<local rank>")."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
    try:
        import deepspeed
    except ImportError:
        raise FlgError("zero=true needs DeepSpeed: pip install 'flgcore[cluster]'") from None
    rank, size, local = world()
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29512")
        os.environ.setdefault("RANK", str(rank)); os.environ.setdefault("WORLD_SIZE", str(size))
        os.environ.setdefault("LOCAL_RANK", str(local))
        deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", verbose=False)
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def ds_config(global_batch: int, grad_clip: float, bf16: bool, offload: bool) -> dict:
    rank, size, _ = world()
    if global_batch % size:
        raise FlgError(f"batch_size={global_batch} must be divisible by the number of processes ({size})")
    zero = {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
            "stage3_gather_16bit_weights_on_model_save": False}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {"train_micro_batch_size_per_gpu": global_batch // size, "gradient_accumulation_steps": 1,
            "gradient_clipping": grad_clip, "zero_optimization": zero, "bf16": {"enabled": bf16},
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def engine(model, optimizer, scheduler, config: dict):
    """A ZeRO-3 engine over `model` with our optimiser and schedule (the frozen parameters are partitioned
    too, so one copy of shared weights is spread over the ranks)."""
    import deepspeed
    eng, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return eng


def shard(*xs):
    """This rank's slice of each batch-first tensor or Cond (the global batch is drawn on every rank)."""
    rank, size, _ = world()

    def cut(t):
        n = t.shape[0] // size
        return t[rank * n:(rank + 1) * n]
    out = [x.map(cut) if isinstance(x, Cond) else cut(x) for x in xs]
    return out[0] if len(out) == 1 else out


def mean_over_ranks(x: float) -> float:
    if world()[1] == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t.item()) / world()[1]


def all_finite(loss: torch.Tensor) -> bool:
    """True only if the loss is finite on every rank (so all ranks stop together)."""
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
    if world()[1] > 1:
        torch.distributed.all_reduce(bad)
    return bad.item() == 0


def shutdown(ok: bool) -> bool:
    """Tear the process group down before the interpreter exits; True if there was one. After a run that succeeded
    on every rank, a barrier first, so that no rank closes its connections while another still uses them. Left to
    the exit handlers, gloo's threads can be destroyed while still joinable: a rank that had finished its run then
    died of SIGABRT ("terminate called without an active exception") in tests/test_zero.py, and the launcher
    reported the run failed (twice in many full-suite runs; see also `cli.entry`)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    if ok:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return True


def barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()


def _step_dirs(out: Path) -> list[Path]:
    return sorted(p for p in (out / "checkpoints").glob("step_*") if p.is_dir())


def save(out: Path, step: int, engines: dict, gens: dict[str, torch.Generator], np_rng, keep: int = 2,
         **client) -> Path:
    """All ranks call this. The step folder appears (by rename) only once every engine and rank is done."""
    rank = world()[0]
    final = out / "checkpoints" / f"step_{step:08d}"
    tmp = out / "checkpoints" / f".tmp_step_{step:08d}"
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    for name, eng in engines.items():
        # frozen weights (the shared base under a LoRA fake DiT) are in the model directory already
        eng.save_checkpoint(str(tmp / name), tag="state", client_state=dict(step=step, **client),
                            exclude_frozen_parameters=True)
    torch.save(dict(gens={k: g.get_state() for k, g in gens.items()}, np_rng=np_rng.bit_generator.state,
                    torch=torch.get_rng_state()), tmp / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in _step_dirs(out)[:-keep]:
            shutil.rmtree(old)
    barrier()
    return final


def resume(out: Path, engines: dict, gens: dict[str, torch.Generator], np_rng) -> tuple[int, dict]:
    """Load the newest complete step folder into the engines and this rank's RNGs: (step, client state)."""
    dirs = _step_dirs(out)
    if not dirs:
        return 0, {}
    ck, client = dirs[-1], {}
    for name, eng in engines.items():
        _, client = eng.load_checkpoint(str(ck / name), tag="state", load_module_strict=False)
    rng = torch.load(ck / f"rng_rank{world()[0]}.pt", weights_only=False)
    for k, g in gens.items():
        g.set_state(rng["gens"][k])
    np_rng.bit_generator.state = rng["np_rng"]
    torch.set_rng_state(rng["torch"])
    if is_main():
        print(f"resuming {out} from step {client['step']} ({world()[1]} processes)")
    return client["step"], client


def gathered_state_dict(module: torch.nn.Module, only: str | None = None) -> dict | None:
    """Full fp32 weights of a ZeRO-3-partitioned module on rank 0 (None elsewhere). `only`: keep the keys
    containing this string (e.g. "lora_" for an adapter).

    A trained parameter comes from the optimiser's fp32 master copy: under bf16 the module holds a copy
    rounded to bf16, which would lose most of a Stage-III run (lr 5e-7 x 1000 steps moves a weight by a
    few bf16 ulps at most). Collective: every rank calls it."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    params = [(n, p) for n, p in module.named_parameters() if only is None or only in n]
    trained = {n for n, p in params if getattr(p, "_z3_optimizer", None) is not None}
    masters = {}
    for n, p in params:  # one at a time, straight to rank 0's CPU: a 14B model's fp32 copy never sits on a GPU
        if n in trained:
            full = safe_get_full_fp32_param(p)
            if is_main():
                masters[n] = full.cpu()
            del full
    with deepspeed.zero.GatheredParameters([p for n, p in params if n not in trained], modifier_rank=None):
        sd = None
        if is_main():
            sd = {k: masters.get(k, v).detach().float().cpu().clone() for k, v in module.state_dict().items()
                  if only is None or only in k}
    if sd is not None:
        empty = [k for k, v in sd.items() if v.numel() == 0]
        if empty:
            raise FlgError(f"gathered weights are empty for {empty[0]} (and {len(empty) - 1} more): refusing to export")
    return sd


def unwrap_state(state: dict, template: torch.nn.Module) -> torch.nn.Module:
    """A fresh fp32 copy of `template`'s class and config holding `state` (rank 0 export)."""
    model = type(template).from_config(template.config)
    model.load_state_dict(state)
    model.flg_prediction = getattr(template, "flg_prediction", "velocity")
    return model.float()

