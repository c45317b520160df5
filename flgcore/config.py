"""Typed dataclass configs read from YAML, strictly: an unknown or mistyped key is refused by name.

`load_config(Cls, path, overrides)` builds a config from defaults, then a YAML file, then
`key=value` overrides (dotted keys reach nested dataclasses); `save_config` writes the resolved
config into the run folder so that every run records exactly what it ran with.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml



class FlgError(ValueError):
    """A user-facing error: the CLI prints its message as one line, without a traceback."""


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
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise FlgError(f"{p}: a config file must be a mapping of keys to values")
        data = loaded
    for ov in overrides:
        if "=" not in ov:
            raise FlgError(f"override {ov!r} must look like key=value")
        k, v = ov.split("=", 1)
        _set_dotted(data, k.strip(), yaml.safe_load(v))
    return from_dict(cls, data)


def save_config(cfg, run_dir: str | Path) -> Path:
    from .runs import atomic_write_text
    return atomic_write_text(Path(run_dir) / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
