"""Block-level model surgery on diffusers transformers: list, skip, prune, select.

Blocks get one global index in forward order (HunyuanVideo: its double blocks, then its single
blocks). Skipping swaps each group's `nn.ModuleList` for one holding only the kept blocks, so the
unchanged diffusers forward simply iterates fewer blocks (skipped blocks cost nothing and the same
parameter objects stay in place); pruning does the same on a copy and updates the registered config,
so `save_pretrained` / `from_pretrained` round-trip the smaller model with no extra code.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint

from .models import family_of
from .config import FlgError


@dataclass(frozen=True)
class Block:
    index: int   # global position in forward order
    group: str   # "block" (Wan) or "double" / "single" (HunyuanVideo)
    local: int   # position inside its group's module list
    params: int  # parameter count
    module: nn.Module


def _base_params(m: nn.Module) -> int:
    """Parameters of a block's own weights: a LoRA adapter does not count, and under ZeRO-3 (where a
    partitioned parameter is an empty placeholder) the full size is `ds_numel`."""
    return sum(getattr(p, "ds_numel", p.numel()) for n, p in m.named_parameters() if "lora_" not in n)


def blocks(model) -> list[Block]:
    """Every DiT block of the model, in forward order, with its global index."""
    out = []
    for group, attr, _ in family_of(model).groups:
        for j, m in enumerate(getattr(model, attr)):
            out.append(Block(len(out), group, j, _base_params(m), m))
    return out


def block_table(model) -> list[dict]:
    """One row per block: index, group, params (and the share of all block parameters)."""
    bl = blocks(model)
    total = sum(b.params for b in bl)
    return [dict(index=b.index, group=b.group, params=b.params, share=b.params / total) for b in bl]


def format_block_table(model) -> str:
    rows = block_table(model)
    lines = [f"{'index':>5}  {'group':<6} {'params':>12}  {'share':>6}"]
    lines += [f"{r['index']:>5}  {r['group']:<6} {r['params']:>12,}  {r['share']:>6.1%}" for r in rows]
    lines.append(f"{len(rows)} blocks, {sum(r['params'] for r in rows):,} block parameters "
                 f"of {sum(p.numel() for p in model.parameters()):,} in all")
    return "\n".join(lines)


def check_indices(model, indices: Iterable[int], what: str = "block index") -> list[int]:
    """Validate block indices (ints in range, no duplicates); returns them sorted."""
    n = len(blocks(model))
    idx = list(indices)
    for i in idx:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise FlgError(f"{what} {i!r} out of range: the model has {n} blocks (0..{n - 1})")
    if len(set(idx)) != len(idx):
        raise FlgError(f"duplicate {what}es in {sorted(idx)}")
    return sorted(idx)


def _kept_by_group(model, keep: Sequence[int]) -> dict[str, list[nn.Module]]:
    keep = set(keep)
    out: dict[str, list[nn.Module]] = {attr: [] for _, attr, _ in family_of(model).groups}
    attr_of = {g: a for g, a, _ in family_of(model).groups}
    for b in blocks(model):
        if b.index in keep:
            out[attr_of[b.group]].append(b.module)
    return out


@contextmanager
def swapped_blocks(model, lists: dict[str, list[nn.Module]]):
    """Within the block, each module-list attribute named in `lists` holds those modules instead; the original
    lists are put back on exit (the one place that swaps block lists: skipping, pruning, Stage I's replays)."""
    originals = {attr: getattr(model, attr) for attr in lists}
    try:
        for attr, mods in lists.items():
            setattr(model, attr, nn.ModuleList(mods))
        yield model
    finally:
        for attr, mods in originals.items():
            setattr(model, attr, mods)


@contextmanager
def skipping(model, drop: Iterable[int]):
    """Within the block, the model's forward skips the blocks in `drop` (global indices).

    On exit the original module lists are put back, so the model is bit-identical to before.
    """
    drop = check_indices(model, drop, "skipped block index")
    if not drop:
        yield model
        return
    keep = [b.index for b in blocks(model) if b.index not in set(drop)]
    with swapped_blocks(model, _kept_by_group(model, keep)):
        yield model


def prune(model, keep: Iterable[int]):
    """A physically smaller copy of `model` (same class) holding only the blocks in `keep`.

    The registered config's block counts are updated, so save_pretrained / from_pretrained work as is,
    and its outputs equal the skip view `skipping(model, complement(keep))`.
    """
    keep = check_indices(model, keep, "kept block index")
    if not keep:
        raise FlgError("a pruned model must keep at least one block")
    kept = _kept_by_group(model, keep)
    # Copy without the blocks first so a large model is not duplicated whole, then attach copies of the kept ones.
    with swapped_blocks(model, {attr: [] for attr in kept}):
        small = copy.deepcopy(model)
    for _, attr, key in family_of(model).groups:
        setattr(small, attr, nn.ModuleList(copy.deepcopy(m) for m in kept[attr]))
        small.register_to_config(**{key: len(kept[attr])})
    return small


def complement(model, indices: Iterable[int]) -> list[int]:
    """All block indices not in `indices`."""
    s = set(check_indices(model, indices))
    return [b.index for b in blocks(model) if b.index not in s]


def check_retention(retention: float) -> float:
    if not isinstance(retention, (int, float)) or not 0 < retention <= 1:
        raise FlgError(f"retention must be in (0, 1], got {retention!r}")
    return float(retention)


def select_keep(scores: Sequence[float], params: Sequence[int], retention: float) -> list[int]:
    """Keep the most important blocks whose parameters fit in `retention` of all block parameters.

    scores[i] is block i's importance (higher = more important, e.g. the Eq. 4 error when it is
    skipped); blocks are taken in descending score order and each one is kept if it still fits the
    budget (so a large HunyuanVideo double block that does not fit can leave room for single ones).
    """
    retention = check_retention(retention)
    if len(scores) != len(params):
        raise FlgError(f"{len(scores)} scores for {len(params)} blocks")
    budget = retention * sum(params) * (1 + 1e-9)  # tolerate float rounding at exact fits
    keep, used = [], 0
    for i in sorted(range(len(scores)), key=lambda i: (-scores[i], i)):
        if used + params[i] <= budget:
            keep.append(i)
            used += params[i]
    if not keep:
        raise FlgError(f"retention {retention} keeps no block (smallest block is {min(params) / sum(params):.1%} "
                       f"of block parameters)")
    return sorted(keep)


def retention_of(model, keep: Iterable[int]) -> float:
    """Fraction of block parameters held by the blocks in `keep`."""
    bl = blocks(model)
    keep = set(check_indices(model, keep))
    return sum(b.params for b in bl if b.index in keep) / sum(b.params for b in bl)


def _checkpoint_marked(block, *args):
    """diffusers' gradient-checkpointing hook, called by the model's forward for every block it runs:
    recompute the marked blocks in backward, keep the others' activations. Calling the module (not its
    forward) keeps its hooks, which DeepSpeed ZeRO-3 needs to gather the block's own parameters again."""
    if getattr(block, "flg_checkpoint", True):
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
    return block(*args)


def checkpoint_share(value) -> float:
    """A `grad_checkpointing` setting as a share of blocks: true -> 1, false -> 0, or a number in [0, 1]."""
    if not isinstance(value, (bool, int, float)) or not 0 <= value <= 1:
        raise FlgError(f"grad_checkpointing must be true, false or a share of blocks in [0, 1], got {value!r}")
    return float(value)


def set_checkpointing(model, share: float | bool) -> list[int]:
    """Gradient checkpointing on `share` of the blocks, evenly spaced (True = 1: all, diffusers' own switch;
    False = 0: off). Returns the checkpointed indices. Checkpointing every block costs about one more
    forward per step (at the 1.3B size on an H100, 33.7 % MFU against 45 % for a model that fits without);
    checkpointing half of them costs half that and holds half the activations. The marks are attributes
    of the blocks, so a pruned copy (`prune`) keeps them."""
    n = len(blocks(model))
    k = round(checkpoint_share(share) * n)
    return checkpoint_blocks(model, [int((i + 0.5) * n / k) for i in range(k)])


def compile_blocks(model, on: bool = True, **kwargs) -> int:
    """Regional compilation: `torch.compile` each block in place (`nn.Module.compile`, as diffusers'
    `compile_repeated_blocks` does, but over every block group this package knows). Blocks of one class
    share their compiled graphs (parameters are graph inputs), so a model costs a few compiles (one per grad
    mode for Wan), the skip views of Stage II need no recompilation, and state-dict keys do not change.
    Fusing each block's norms, modulation and RoPE is the usual lever for training MFU on a GPU.
    A copy (`prune`, `copy.deepcopy`) comes out uncompiled: nn.Module drops the compiled call when copied.
    `kwargs` go to `torch.compile`; `on=False` undoes it. Returns the number of blocks compiled."""
    bs = blocks(model)
    for b in bs:
        if on:
            b.module.compile(**kwargs)
        else:
            b.module._compiled_call_impl = None
    return len(bs) if on else 0


def check_compile(compile: bool, zero: bool) -> None:
    """Regional compilation is untested under DeepSpeed, which gathers each block's weights in module hooks."""
    if compile and zero:
        raise FlgError("compile=true is not supported with zero=true (ZeRO-3 gathers each block's weights in hooks)")


def checkpoint_blocks(model, indices: Iterable[int]) -> list[int]:
    """Gradient checkpointing on exactly the blocks in `indices` (none: off). Returns them sorted."""
    marked = set(check_indices(model, indices, "checkpointed block index"))
    for b in blocks(model):
        b.module.flg_checkpoint = b.index in marked
    if marked:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=_checkpoint_marked)
    else:
        model.disable_gradient_checkpointing()
    return sorted(marked)


def checkpointed(model) -> list[int]:
    """Indices of the blocks whose activations are recomputed in backward (all of them under diffusers' own
    `enable_gradient_checkpointing()`, the marked ones under `set_checkpointing`)."""
    if not model.is_gradient_checkpointing:
        return []
    ours = getattr(model, "_gradient_checkpointing_func", None) is _checkpoint_marked
    return [b.index for b in blocks(model) if not ours or getattr(b.module, "flg_checkpoint", True)]
