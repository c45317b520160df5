"""Typed dataclass configs read from YAML, strictly: an unknown or mistyped key is refused by name.

`load_config(Cls, path, overrides)` builds a config from defaults, then a YAML file, then
`key=value` overrides (dotted keys reach nested dataclasses); `save_config` writes the resolved
config into the run folder so that every run records exactly what it ran with.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml



class FlgError(ValueError):
    """A user-facing error: the CLI prints its message as one line, without a traceback."""


def read_json_file(path: str | Path, what: str):
    """A JSON file's content, or a one-line FlgError naming it (`what`: e.g. "suite") when it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise FlgError(f"{what} {path}: no such file")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise FlgError(f"{what} {path}: not JSON ({e})") from None


def _check(value: Any, hint: Any, key: str) -> Any:
    """Return `value` coerced to `hint` (int -> float, list -> tuple), or raise naming `key`."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, key)
            except FlgError as e:
                errors.append(str(e))
        raise FlgError(errors[0] if errors else f"config key {key!r}: bad value {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise FlgError(f"config key {key!r} must be a mapping, got {value!r}")
        return from_dict(hint, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise FlgError(f"config key {key!r} must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_check(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is bool and not isinstance(value, bool) or hint in (int, float) and isinstance(value, bool):
        raise FlgError(f"config key {key!r} must be {hint.__name__}, got {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise FlgError(f"config key {key!r} must be {hint.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a dict, refusing unknown keys and wrong types."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            raise FlgError(f"unknown config key '{prefix}{k}'; allowed: {', '.join(names)}")
    base = cls()
    kw = {k: _check(v, hints[k], prefix + k) for k, v in data.items()}
    return dataclasses.replace(base, **kw)


def to_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)

    def plain(v):  # YAML-friendly: tuples as lists
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(d)


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise FlgError(f"config key {dotted!r}: {k!r} is not a section")
    d[keys[-1]] = value


def load_config(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """Defaults < YAML file < `key=value` overrides (values parsed as YAML scalars)."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FlgError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise FlgError(f"{p}: not valid YAML ({_yaml_problem(e)})") from None
        if not isinstance(loaded, dict):
            raise FlgError(f"{p}: a config file must be a mapping of keys to values")
        data = loaded
    for ov in overrides:
        if "=" not in ov:
            raise FlgError(f"override {ov!r} must look like key=value")
        k, v = ov.split("=", 1)
        try:
            _set_dotted(data, k.strip(), yaml.safe_load(v))
        except yaml.YAMLError as e:
            raise FlgError(f"override {ov!r}: its value is not valid YAML ({_yaml_problem(e)})") from None
    cfg = from_dict(cls, data)
    check_values(cfg, paths=False)
    return cfg


def save_config(cfg, run_dir: str | Path) -> Path:
    from .runs import atomic_write_text
    return atomic_write_text(Path(run_dir) / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- value checks
# A config that parses can still hold a value no run can use (batch_size=0, lr=-1, a seed numpy refuses, a
# missing selection); `check_values` refuses it by key and value before a stage writes anything. The rules go
# by field name, so one table serves every stage config and the notebooks' parameters (named like the fields):
# a name without a rule of its own takes the rule of its tail (eval_n -> n, stage3_fake_lr -> fake_lr -> lr),
# or of its singular (retentions -> retention, clip_seeds -> seed); a list is checked item by item.

def _num(ok, desc: str, integer: bool = False):
    import math

    def rule(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None  # None (a default), or another type the field allows: not a number's rule to judge
        if integer and not isinstance(v, int):
            return desc
        return None if math.isfinite(v) and ok(v) else desc
    return rule


_COUNT = _num(lambda v: v >= 1, "an integer >= 1", integer=True)
_INDEX = _num(lambda v: v >= 0, "an integer >= 0", integer=True)
_NONNEG, _POSITIVE = _num(lambda v: v >= 0, ">= 0"), _num(lambda v: v > 0, "> 0")
_UNIT, _PROB = _num(lambda v: 0 < v <= 1, "in (0, 1]"), _num(lambda v: 0 <= v <= 1, "in [0, 1]")


def _out(v):
    if not isinstance(v, str):
        return None
    p = Path(v)
    return "a folder, not an existing file" if any(q.is_file() for q in (p, *p.parents)) else None


def _exists(kind: str):
    def rule(v):
        if not isinstance(v, str) or not v:
            return None
        return None if (Path(v).is_dir() if kind == "folder" else Path(v).is_file()) else f"an existing {kind}"
    return rule


def _model(v):
    if not isinstance(v, str) or not v or v.startswith("tiny:"):
        return None
    from .models import BUILTIN  # models imports torch: only once a path is checked
    return None if v in BUILTIN or Path(v).exists() else f"an existing model folder or one of {', '.join(BUILTIN)}"


def _data(v):
    if not isinstance(v, str) or v == "synth" or Path(v).is_dir():
        return None
    return "'synth' or an existing latent cache folder"


def _selection(v):
    import json
    if not isinstance(v, str) or not v:
        return None
    try:
        sel = json.loads(Path(v).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"a readable Stage-I selection.json ({type(e).__name__})"
    if not isinstance(sel, dict) or not all(isinstance(sel.get(k), list) for k in ("kept", "dropped")):
        return "a Stage-I selection.json (with lists 'kept' and 'dropped')"
    return None


VALUE_RULES = {
    **dict.fromkeys(["steps", "batch_size", "n", "repeats", "boot", "jobs", "frames", "frame_stride", "height",
                     "width", "shard_size", "ckpt_every", "log_every", "fake_updates", "lora_rank", "text_len",
                     "blocks", "num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "text_dim",
                     "freq_dim", "patch_size"], _COUNT),
    **dict.fromkeys(["seed", "seed_offset", "warmup", "threads", "workers", "videos", "max_sequence_length", "drop",
                     "skip"], _INDEX),
    # lr=0 is allowed: a run that keeps its weights (a warm start's check, a frozen baseline)
    **dict.fromkeys(["lr", "weight_decay", "beta1_range", "beta2_range", "cfg", "cfg_scale"], _NONNEG),
    **dict.fromkeys(["grad_clip", "shift", "peak_tflops"], _POSITIVE),
    **dict.fromkeys(["sigmas", "min_sigma", "max_sigma", "retention", "p"], _UNIT),
    **dict.fromkeys(["alpha", "cond_dropout"], _PROB),
    "ema_decay": _num(lambda v: 0 <= v < 1, "in [0, 1)"),
    "out": _out,
}
PATH_RULES = {"model": _model, "init_from": _model, "student": _model, "selection": _selection, "data": _data,
              "clips": _exists("folder"), "pipeline": _exists("folder"), "manifest": _exists("file")}
# (value rules, path rules) of one config class, before the tables above
CLASS_RULES = {"PretrainConfig": ({"steps": _INDEX}, {}),  # the teacher's steps=0 exports its untrained init
               "BenchConfig": ({}, {"teacher": _model})}  # Stage III's `teacher` is a choice, the bench's a model


def _rule(name: str, table: dict):
    parts = name.split("_")
    for k in range(len(parts)):  # the whole name, then shorter tails; each also as a singular
        tail = "_".join(parts[k:])
        for key in (tail, tail[:-1] if tail.endswith("s") else None):
            if key in table:
                return table[key]
    return None


def check_values(cfg, paths: bool = True, prefix: str = "") -> None:
    """Refuse, naming the key and the value, any field of a config dataclass (or entry of a mapping of notebook
    parameters) that breaks its rule in VALUE_RULES; with `paths`, also an input that does not exist or cannot
    be read (PATH_RULES: model, selection, data, ...). `load_config` checks the values and leaves the paths to
    the stage, so that `flg check` can list every missing path; each `run_<stage>` calls it whole, first."""
    own_values, own_paths = CLASS_RULES.get(type(cfg).__name__, ({}, {}))
    fields = [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)] if dataclasses.is_dataclass(cfg) \
        else dict(cfg).items()
    for name, value in fields:
        key = prefix + name
        if dataclasses.is_dataclass(value):
            check_values(value, paths, prefix=f"{key}.")
            continue
        rule = own_values.get(name) or (paths and own_paths.get(name)) or _rule(name, VALUE_RULES) \
            or (paths and _rule(name, PATH_RULES)) or None
        if rule is None:
            continue
        for i, v in enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]:
            if (desc := rule(v)) is not None:
                raise FlgError(f"config key {key if i is None else f'{key}[{i}]'!r} must be {desc}, got {v!r}")


def _yaml_problem(e: Exception) -> str:
    """One line out of a (multi-line) YAML error: what went wrong and where."""
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{what}, line {mark.line + 1} column {mark.column + 1}" if mark is not None else what
