"""Surgery invariants on tiny random models of every supported diffusers class."""
import pytest
import torch

from flgcore.models import load_transformer, probe_inputs, velocity
from flgcore.config import FlgError
from flgcore.surgery import (block_table, blocks, checkpointed, compile_blocks, complement, prune, retention_of,
                             select_keep, set_checkpointing, skipping)


def _v(model, inputs):
    with torch.no_grad():
        return velocity(model, *inputs)


def _drop_for(model):
    groups = [b.group for b in blocks(model)]
    if "double" in groups:  # drop a double and a single block
        return [groups.index("double") + 1, groups.index("single") + 1]
    return [1, len(groups) - 2]


def test_skipping_nothing_is_bit_identical(tiny):
    inputs = probe_inputs(tiny)
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    v0 = _v(tiny, inputs)
    with skipping(tiny, []):
        assert torch.equal(_v(tiny, inputs), v0)
    with skipping(tiny, _drop_for(tiny)):
        assert not torch.allclose(_v(tiny, inputs), v0)
    assert torch.equal(_v(tiny, inputs), v0)  # restored on exit
    assert all(torch.equal(v, state[k]) for k, v in tiny.state_dict().items())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_skip_view_equals_pruned_and_reloaded(tiny, tmp_path, checkpointing):
    drop = _drop_for(tiny)
    inputs = probe_inputs(tiny)
    if checkpointing:
        tiny.enable_gradient_checkpointing()
    with torch.enable_grad(), skipping(tiny, drop):  # checkpointing only acts with grad enabled
        v_skip = velocity(tiny, *inputs).detach()
    small = prune(tiny, complement(tiny, drop))
    assert type(small) is type(tiny) and len(blocks(small)) == len(blocks(tiny)) - len(drop)
    small.save_pretrained(tmp_path)
    reloaded = load_transformer(tmp_path)
    for m in (small, reloaded):
        torch.testing.assert_close(_v(m, inputs), v_skip, rtol=1e-5, atol=1e-6)
    assert len(blocks(reloaded)) == len(blocks(small))


def test_gradient_checkpointing_does_not_change_skip_view(tiny):
    inputs, drop = probe_inputs(tiny), _drop_for(tiny)
    with skipping(tiny, drop):
        v_plain = velocity(tiny, *inputs)
    tiny.enable_gradient_checkpointing()
    with skipping(tiny, drop):
        v_ckpt = velocity(tiny, *inputs)
        v_ckpt.sum().backward()
    torch.testing.assert_close(v_ckpt, v_plain)
    skipped = {id(p) for i in drop for p in blocks(tiny)[i].module.parameters()}
    assert all(p.grad is None for p in tiny.parameters() if id(p) in skipped)


def _grads_and_calls(model, inputs):
    """Gradients of one backward, and how often each block started a forward (a recomputed block: twice; a
    pre-hook, since recomputation stops as soon as it has what backward needs)."""
    calls = [0] * len(blocks(model))
    hooks = [b.module.register_forward_pre_hook(lambda *_, i=b.index: calls.__setitem__(i, calls[i] + 1))
             for b in blocks(model)]
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        velocity(model, *inputs).square().sum().backward()
    for h in hooks:
        h.remove()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, calls


def test_partial_checkpointing_recomputes_only_the_marked_blocks(tiny):
    inputs, n = probe_inputs(tiny), len(blocks(tiny))
    assert set_checkpointing(tiny, False) == [] and not tiny.is_gradient_checkpointing
    g0, calls = _grads_and_calls(tiny, inputs)
    assert calls == [1] * n
    marked = set_checkpointing(tiny, 0.5)
    assert len(marked) == round(n / 2) and checkpointed(tiny) == marked
    g, calls = _grads_and_calls(tiny, inputs)
    assert calls == [2 if i in marked else 1 for i in range(n)]
    assert g.keys() == g0.keys()
    for k in g0:
        torch.testing.assert_close(g[k], g0[k], rtol=1e-5, atol=1e-6)
    keep = complement(tiny, _drop_for(tiny))  # a pruned copy keeps the marks of the blocks it keeps
    assert checkpointed(prune(tiny, keep)) == [j for j, i in enumerate(keep) if i in marked]
    assert set_checkpointing(tiny, True) == list(range(n)) == checkpointed(tiny)
    tiny.enable_gradient_checkpointing()  # diffusers' own switch: every block
    assert checkpointed(tiny) == list(range(n)) and _grads_and_calls(tiny, inputs)[1] == [2] * n
    with pytest.raises(FlgError, match="grad_checkpointing"):
        set_checkpointing(tiny, 1.5)
    set_checkpointing(tiny, 0)


def test_compiled_blocks_keep_outputs_and_keys_and_prune_to_their_own_weights(tiny):
    """Regional compilation changes neither the outputs, the skip view nor the state-dict keys; a pruned copy
    of a compiled model runs (and trains) its own weights, not the original's."""
    inputs, drop = probe_inputs(tiny), _drop_for(tiny)
    v0 = _v(tiny, inputs)
    with skipping(tiny, drop):
        v_skip = _v(tiny, inputs)
    keys = list(tiny.state_dict())
    assert compile_blocks(tiny, backend="eager") == len(blocks(tiny))  # dynamo without inductor: fast on the CPU
    torch.testing.assert_close(_v(tiny, inputs), v0)
    with skipping(tiny, drop):
        torch.testing.assert_close(_v(tiny, inputs), v_skip)
    assert list(tiny.state_dict()) == keys
    small = prune(tiny, complement(tiny, drop))
    velocity(small, *inputs).square().mean().backward()
    assert all(p.grad is not None for b in blocks(small) for p in b.module.parameters() if p.requires_grad)
    assert all(p.grad is None for b in blocks(tiny) for p in b.module.parameters())
    compile_blocks(tiny, on=False)
    assert all(b.module._compiled_call_impl is None for b in blocks(tiny))


def test_block_table_adds_up(tiny):
    rows = block_table(tiny)
    per_group = {}
    for r in rows:
        per_group[r["group"]] = per_group.get(r["group"], 0) + r["params"]
    attrs = {"block": "blocks", "double": "transformer_blocks", "single": "single_transformer_blocks"}
    for g, n in per_group.items():
        assert n == sum(p.numel() for p in getattr(tiny, attrs[g]).parameters())
    assert [r["index"] for r in rows] == list(range(len(rows)))
    assert abs(sum(r["share"] for r in rows) - 1) < 1e-9


def test_selection_respects_budget_and_ranking():
    scores = [5.0, 1.0, 0.5, 0.2, 0.9, 4.0]
    params = [10] * 6
    keep = select_keep(scores, params, 0.5)
    assert keep == [0, 1, 5]  # the top 3 by score
    # unequal sizes: a large block that does not fit leaves room for smaller ones
    keep = select_keep([3, 2, 1, 0], [50, 30, 20, 20], 0.6)
    assert sum([50, 30, 20, 20][i] for i in keep) <= 0.6 * 120
    assert keep == [0, 2]
    for r in (0.2, 0.3, 0.77, 1.0):
        k = select_keep(scores, params, r)
        assert sum(params[i] for i in k) <= r * sum(params) + 1e-9


def test_retention_of_tiny(tiny):
    n = len(blocks(tiny))
    assert retention_of(tiny, range(n)) == pytest.approx(1.0)
    keep = select_keep(list(range(n)), [b.params for b in blocks(tiny)], 0.5)
    assert retention_of(tiny, keep) <= 0.5 + 1e-9


@pytest.mark.parametrize("bad", [-1, 99, 1.5])
def test_out_of_range_index_is_a_clear_error(bad):
    from flgcore.models import tiny_model
    m = tiny_model("wan-t2v")
    with pytest.raises(FlgError, match=f"block index {bad!r} out of range"):
        with skipping(m, [bad]):
            pass
    with pytest.raises(FlgError, match="out of range"):
        prune(m, [0, bad])


@pytest.mark.parametrize("r", [0, -0.2, 1.01, 2])
def test_retention_outside_unit_interval_is_refused(r):
    with pytest.raises(FlgError, match=r"retention must be in \(0, 1\]"):
        select_keep([1, 2], [1, 1], r)
