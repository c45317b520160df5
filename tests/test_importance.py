"""Stage I: the Eq. 4 / Eq. 3 scores, prefix reuse equal to the naive way, selection outputs."""
import json

import pytest
import torch

from flgcore import flow
from flgcore.importance import (Stage1Config, count_block_calls, eq3_error, eq4_error, iterative_path,
                                iterative_selection, keep_after, run_stage1, skip_each)
from flgcore.models import probe_inputs, velocity
from flgcore.surgery import blocks, skipping


def test_eq4_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    x0, eps, v = (torch.randn(3, 2, 2, 4, 4, generator=g) for _ in range(3))
    s = torch.tensor([0.2, 0.5, 0.9])
    x_s = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * eps
    direct = torch.stack([((x_s[b] - s[b] * v[b] - x0[b]) ** 2).mean() for b in range(3)])
    torch.testing.assert_close(eq4_error(x_s, s, v, x0), direct)
    # the true velocity gives zero error; Eq. 3 of identical outputs is zero
    assert eq4_error(x_s, s, flow.velocity_target(x0, eps), x0).abs().max() < 1e-10
    assert eq3_error(v, v).abs().max() == 0


def test_prefix_reuse_equals_naive_and_costs_less(tiny):
    x, s, cond = probe_inputs(tiny)
    n = len(blocks(tiny))
    with count_block_calls(tiny) as c_naive:
        naive, v_full_naive = skip_each(tiny, x, s, cond, reuse=False)
    with count_block_calls(tiny) as c_reuse:
        reuse, v_full = skip_each(tiny, x, s, cond, reuse=True)
    stored_on_cpu, _ = skip_each(tiny, x, s, cond, reuse=True, store="cpu")  # a no-op move here; see test_gpu
    for i in range(n):
        torch.testing.assert_close(reuse[i], naive[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stored_on_cpu[i], reuse[i], rtol=0, atol=0)
        with torch.no_grad(), skipping(tiny, [i]):  # and both equal the plain skip view
            torch.testing.assert_close(reuse[i], velocity(tiny, x, s, cond), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v_full, v_full_naive)
    assert c_reuse["n"] == n + n * (n - 1) // 2
    assert c_naive["n"] == n + n * (n - 1)


def test_reuse_with_a_drop_set(tiny):
    x, s, cond = probe_inputs(tiny)
    n = len(blocks(tiny))
    active = [i for i in range(n) if i != 1]
    reuse, _ = skip_each(tiny, x, s, cond, active=active)
    for i in active:
        with torch.no_grad(), skipping(tiny, [1, i]):
            torch.testing.assert_close(reuse[i], velocity(tiny, x, s, cond), rtol=1e-5, atol=1e-6)


def test_one_greedy_path_gives_every_retentions_selection(tiny):
    # the path computed once to the lowest retention equals the greedy run separately at each retention
    g = torch.Generator().manual_seed(0)
    x, s, cond = probe_inputs(tiny)
    batches = [(torch.randn(x.shape, generator=g), cond, torch.randn(x.shape, generator=g), s) for _ in range(2)]
    n = len(blocks(tiny))
    path = iterative_path(tiny, batches, 1 / n, "eq4", progress=False)
    assert sorted(path) == sorted(set(path)) and len(path) == n - 1
    for r in (1.0, 0.75, 0.5, 1 / n):
        alone = iterative_selection(tiny, batches, r, "eq4", progress=False)
        assert keep_after(tiny, path, r) == alone
        assert 1 <= len(alone) <= n


@pytest.mark.parametrize("method", ["oneshot", "iterative"])
def test_stage1_run_writes_its_tables(tiny_bundle_dir, tmp_path, method):
    cfg = Stage1Config(model=str(tiny_bundle_dir), out=str(tmp_path), n=4, batch_size=2, sigmas=[0.3, 0.8],
                       retention=0.5, method=method)
    m = run_stage1(cfg)
    import pandas as pd
    imp = pd.read_csv(tmp_path / "importance.csv")
    assert len(imp) == 4 * 2 and set(imp.columns) >= {"block", "sigma", "mean", "se", "group", "params"}
    sel = json.loads((tmp_path / "selection.json").read_text())
    assert sorted(sel["kept"] + sel["dropped"]) == [0, 1, 2, 3]
    assert sel["retention"] <= 0.5 + 1e-9 and len(sel["kept"]) == 2
    assert m["scores_identical"] and m["reuse_block_evals"] < m["naive_block_evals"]
    assert (tmp_path / "importance.png").is_file() and (tmp_path / "config.yaml").is_file()
    if method == "oneshot":  # the keep set is the top of the ranking
        blocks_csv = pd.read_csv(tmp_path / "blocks.csv")
        top = blocks_csv.sort_values("importance", ascending=False).block.tolist()[:2]
        assert sorted(top) == sel["kept"]


def test_stage1_bad_values_are_refused(tiny_bundle_dir, tmp_path):
    from flgcore.config import FlgError
    with pytest.raises(FlgError, match="retention"):
        run_stage1(Stage1Config(model=str(tiny_bundle_dir), out=str(tmp_path), retention=1.5))
    with pytest.raises(FlgError, match="method"):
        run_stage1(Stage1Config(model=str(tiny_bundle_dir), out=str(tmp_path), method="random"))
    assert not (tmp_path / "config.yaml").exists()


def test_selection_comparison_table_is_reused_only_for_the_same_parameters(tiny_bundle_dir, tmp_path, monkeypatch):
    import pandas as pd
    from flgcore import report
    from flgcore.sampling import load_bundle
    bundle = load_bundle(str(tiny_bundle_dir))
    by_block = pd.DataFrame(dict(block=range(4), importance=[0.4, 0.1, 0.2, 0.3]))
    csv = tmp_path / "sel.csv"
    first = report.selection_comparison(bundle, by_block, [0.5], 4, [0.3], csv=csv)
    assert set(first.method) == {"oneshot", "iterative"} and csv.is_file()
    calls = []
    from flgcore import selection
    real = selection._selection_comparison
    monkeypatch.setattr(selection, "_selection_comparison", lambda *a: calls.append(a) or real(*a))
    again = report.selection_comparison(bundle, by_block, [0.5], 4, [0.3], csv=csv)
    assert calls == [] and list(again.eq3_error) == pytest.approx(list(first.eq3_error))
    report.selection_comparison(bundle, by_block, [0.75], 4, [0.3], csv=csv)  # another retention: recomputed
    assert len(calls) == 1
