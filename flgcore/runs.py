"""Run folders: atomic writes, JSON logs and resumable checkpoints with every RNG state.

A write goes to a temp file (or folder) beside its target and is renamed into place, so a run
killed at any moment leaves either the previous file or the new one, never half of one.
Checkpoints live in `<run>/checkpoints/step_<N>/`; the newest complete one is resumed.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .config import FlgError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    # mkstemp creates 0600; give the file the mode a plain open() would, so colleagues on a shared
    # cluster can read metrics.json and configs.
    os.fchmod(fd, 0o666 & ~_umask())
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def append_jsonl(path: str | Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for k, g in (generators or {}).items():
        state[f"gen:{k}"] = g.get_state()
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in (generators or {}).items():
        g.set_state(state[f"gen:{k}"])


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write `state` (a dict of state_dicts, tensors and picklable values) as checkpoints/step_N, atomically.

    The new folder is complete before it is renamed into place; older ones beyond `keep` are removed
    only after that, so an interruption never leaves the run without a good checkpoint.
    """
    ck = Path(run_dir) / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    final = ck / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=ck, prefix=".tmp_"))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp creates 0700; a checkpoint folder gets the mode of a plain mkdir
    torch.save(state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(ck.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    done = sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*") if (p / "state.pt").is_file())
    return done[-1] if done else None


# ----------------------------------------------------------------------------- run identity
# One definition, used by the stages, `report.run` and the notebooks' runner: a run folder holds a run of a
# config (config.yaml) made from input weights (inputs.json, content prints); metrics.json is written last.

# Settings that change how a run executes, not what it computes: a run may resume under other values of these.
RUNTIME_FIELDS = {"out", "threads", "device", "workers", "compile", "attention", "ckpt_every", "log_every", "offload",
                  "grad_checkpointing"}
INPUT_FIELDS = ("model", "selection", "stage2_model")  # fields that name weights a run starts from


def run_inputs(fields: dict) -> dict:
    """Content prints (`models.fingerprint`) of the weights named by `fields`: a new `synth-tiny` shipped under
    the same name, or a Stage-II run redone into the same folder, is new input."""
    from .models import fingerprint
    return {k: fingerprint(v) for k in INPUT_FIELDS if (v := fields.get(k))}


def run_status(cfg, run_dir: str | Path) -> str:
    """What `run_dir` holds for config `cfg`:

    - "new": nothing of a run (no folder, an empty one, or a start that wrote no checkpoint or metrics);
    - "foreign": a folder with other content and no config.yaml (not a run folder);
    - "finished": a finished run of this config from these inputs;
    - "resumable": the same, unfinished (it resumes from its newest checkpoint);
    - "other": a run of another config or from other input weights, or of another stage (its config.yaml has
      keys that `cfg` lacks). Keys absent from an older config.yaml, and RUNTIME_FIELDS, are not compared.
    """
    import yaml
    from .config import to_dict
    out = Path(run_dir)
    if not out.is_dir() or not any(out.iterdir()):
        return "new"
    if not (out / "config.yaml").is_file():
        return "foreign"
    started = (out / "metrics.json").is_file() or latest_checkpoint(out) is not None
    if not started:
        return "new"
    old = yaml.safe_load((out / "config.yaml").read_text()) or {}
    new = yaml.safe_load(yaml.safe_dump(to_dict(cfg)))  # the same round trip the saved one took
    if old.keys() - new.keys():  # another stage's run: a Stage I folder shares model, data, batch_size, seed...
        return "other"
    if any(k in old and k not in RUNTIME_FIELDS and old[k] != v for k, v in new.items()):
        return "other"
    if not (out / "inputs.json").is_file() or read_json(out / "inputs.json") != run_inputs(new):
        return "other"
    return "finished" if (out / "metrics.json").is_file() else "resumable"


@contextmanager
def run_lock(run_dir: str | Path):
    """Held while this process works on `run_dir`: a second process that reaches the same folder (a notebook and a
    script, two notebooks, two sweeps sharing a run) waits here for the first, then finds its run finished, rather than
    training into the same folder at the same time. An flock on a hidden file beside the folder: the kernel releases
    it when its holder exits, killed or not."""
    import fcntl
    out = Path(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{out}: another process is working on it; waiting for it", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def start_run(cfg, run_dir: str | Path, main: bool = True) -> dict | None:
    """Stages call this before they write anything. A finished run of this config: its metrics (nothing to do).
    A run of another config: refused, since its checkpoints would be resumed as this one's (a run resumed under
    a new `steps` would continue a cosine schedule that had already finished). Otherwise the folder records
    the config and inputs (on the main process) and None is returned: train, resuming if there is a checkpoint."""
    from .config import save_config, to_dict
    out = Path(run_dir)
    status = run_status(cfg, out)
    if status == "finished":
        print(f"{out} is finished; remove it to re-run")
        return read_json(out / "metrics.json")
    if status == "other":
        raise FlgError(f"{out} holds a run of another config or of other input weights; "
                       "pass another out= or delete the folder to start over")
    if main:
        save_config(cfg, out)
        write_json(out / "inputs.json", run_inputs(to_dict(cfg)))
    return None


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(Path(path) / "state.pt", weights_only=False, map_location="cpu")


# ----------------------------------------------------------------------------- training helpers

def setup_torch(threads: int = 0, device: str = "cpu") -> None:
    """CPU threads (0: torch's default) and, on CUDA, TF32 matmuls (~1e-3 relative error, far under the
    noise of training; several times faster than full fp32 on Hopper)."""
    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def check_precision(precision: str) -> None:
    if precision not in ("fp32", "bf16"):
        raise FlgError(f"precision must be fp32 or bf16, got {precision!r}")


def autocast(precision: str, device: str, zero: bool = False):
    """The forward of a training step at `precision`: bf16 is mixed precision, bf16 matmuls and
    convolutions over fp32 master weights, gradients and AdamW states (fp32: a no-op context).

    Why not bf16 weights: bf16 keeps 8 significant bits, so an Adam step of ~lr = 1e-5 (the paper's Stage
    II rate) is under half an ulp of any weight above 2^-8 and rounds away (measured on synth-tiny: 95 % of a
    block's q-projection stayed at its initial value through 4 Stage-II steps). With zero=true DeepSpeed
    keeps the fp32 master copies itself and this is a no-op too."""
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16" and not zero)


def warmup_cosine(opt, warmup: int, steps: int):
    """Linear warm-up, then cosine decay to 0 at `steps` (a LambdaLR: its state is just the step count)."""
    import math
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / max(1, steps))))


@torch.no_grad()
def ema_update(ema: dict, model: torch.nn.Module, decay: float, step: int) -> None:
    """EMA of the weights, with a short warm-up so early averages are not dominated by the init."""
    d = min(decay, (1 + step) / (10 + step))
    avg, new = [], []
    for k, p in model.state_dict().items():
        if p.dtype.is_floating_point:
            avg.append(ema[k]); new.append(p.detach().to(ema[k].device, ema[k].dtype))
        else:
            ema[k].copy_(p)
    torch._foreach_lerp_(avg, new, 1 - d)  # one fused update: a per-tensor loop costs more than a tiny model's step


def save_train_state(run_dir, step: int, model, opt, sched, gens: dict, np_rng, ema: dict | None = None,
                     **extra) -> Path:
    """Checkpoint everything a bit-identical resume needs: weights, optimiser, schedule, step, every RNG."""
    return save_checkpoint(run_dir, step, dict(model=model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                                               ema=ema, step=step, np_rng=np_rng.bit_generator.state,
                                               rng=rng_state(gens), **extra))


def resume_train_state(run_dir, model, opt, sched, gens: dict, np_rng) -> tuple[int, dict]:
    """Load the newest checkpoint into the given objects; returns (step, the checkpoint dict) or (0, {})."""
    ck = latest_checkpoint(run_dir)
    if ck is None:
        return 0, {}
    st = load_checkpoint(ck)
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["opt"])
    sched.load_state_dict(st["sched"])
    np_rng.bit_generator.state = st["np_rng"]
    set_rng_state(st["rng"], gens)
    print(f"resuming {run_dir} from step {st['step']}")
    return st["step"], st
