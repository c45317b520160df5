"""The layer-importance explorer: its readouts are Stage I's functions, its buttons Stage I's choices, its saved
selection Stage II's input; and no library call changes the kernel's plotting state."""
import json
import os
import time

import matplotlib
import numpy as np
import pytest
import torch

from flgcore import report
from flgcore.importance import (Stage1Config, count_block_calls, eq3_error, run_stage1, score_blocks, set_errors,
                                summarise)
from flgcore.models import probe_inputs, velocity
from flgcore.surgery import blocks, retention_of, select_keep, skipping

CLIP = dict(clip_seeds=[2000000000], clip_steps=2, n=2, batch_size=2)


def test_a_skip_sets_errors_with_prefix_reuse_equal_the_skip_view(tiny):
    g = torch.Generator().manual_seed(0)
    x, s, cond = probe_inputs(tiny)
    batches = [(torch.randn(x.shape, generator=g), cond, torch.randn(x.shape, generator=g), s) for _ in range(2)]
    n, cache = len(blocks(tiny)), {}
    assert set_errors(tiny, batches, [], cache).eq3.abs().max() == 0
    for drop in ([n - 1], [1], [1, n - 1], list(range(1, n))):
        with count_block_calls(tiny) as calls:
            got = set_errors(tiny, batches, drop, cache)
        assert calls["n"] == 2 * len([i for i in range(n) if i > min(drop) and i not in drop])  # only after the first skip
        want = []
        for x0, c, eps, sig in batches:
            x_s = (1 - sig.view(-1, 1, 1, 1, 1)) * x0 + sig.view(-1, 1, 1, 1, 1) * eps
            with torch.no_grad():
                v_full = velocity(tiny, x_s, sig, c)
                with skipping(tiny, drop):
                    want.append(eq3_error(velocity(tiny, x_s, sig, c), v_full))
        np.testing.assert_allclose(got.eq3, torch.cat(want).numpy(), rtol=1e-4, atol=1e-8)


@pytest.fixture(scope="module")
def stage1_runs(tiny_bundle_dir, tmp_path_factory):
    """Stage I on the tiny teacher with each selection method (4 blocks, retention 0.5)."""
    out = tmp_path_factory.mktemp("stage1")
    for method in ("oneshot", "iterative"):
        run_stage1(Stage1Config(model=str(tiny_bundle_dir), out=str(out / method), n=4, batch_size=2,
                                sigmas=[0.3, 0.8], retention=0.5, method=method, compare_naive=False))
    return out


def test_driving_the_widgets_changes_the_readouts_as_stage_I_says(tiny_bundle_dir, stage1_runs):
    ex = report.explorer(str(tiny_bundle_dir), stage1=stage1_runs / "oneshot", debounce=0, **CLIP)
    model, clips_before, bars_before = ex.model, ex.clips_img.value, ex.bars_img.value
    assert ex.skip == [] and ex.readout()["eq3"] == 0 and ex.readout()["retention"] == 1
    ex.toggles[1].value = True  # a click on block 1's toggle
    r = ex.readout()
    assert ex.skip == [1] and r["retention"] == retention_of(model, [0, 2, 3])
    assert r["eq3"] == pytest.approx(report.set_error(model, ex.batches, [1]), rel=1e-5)  # the naive way
    single = score_blocks(model, ex.batches, "eq3", progress=False)  # Stage I's Eq. 3 score of block 1
    assert r["eq3"] == pytest.approx(single[single.block == 1].err.mean(), rel=1e-5)
    assert r["eq3_se"] == pytest.approx(single[single.block == 1].err.std(ddof=1) / np.sqrt(r["n"]), rel=1e-4)
    assert r["speedup"] == pytest.approx(50 * 2 / (4 * r["retention"]))  # the teacher's 50 Euler steps with CFG
    assert ex.clips_img.value != clips_before and ex.bars_img.value != bars_before
    assert "skip [1]" in ex.readout_html.value and ex.history[0]["skip"] == "[1]"
    ex.steps_slider.value = 2
    assert ex.readout()["speedup"] == pytest.approx(2 * r["speedup"])
    ex.sigma_pick.value = "0.3"  # the per-sigma view: the same per-sample errors, those drawn at 0.3
    at = ex.errors([1])
    assert ex.readout()["eq3"] == pytest.approx(at[np.isclose(at.sigma, 0.3)].eq3.mean())
    assert ex.scores().importance.tolist() == pytest.approx(
        ex.by_sigma[np.isclose(ex.by_sigma.sigma, 0.3)].sort_values("block")["mean"].tolist())
    ex.sigma_pick.value = "all"
    for method in ("oneshot", "iterative"):  # the buttons give Stage I's keep set at the retention
        ex.ret_slider.value = 0.5
        ex.buttons[method].click()
        sel = json.loads((stage1_runs / method / "selection.json").read_text())
        assert ex.skip == sel["dropped"], method
        assert ex.readout()["eq3"] == pytest.approx(report.set_error(model, ex.batches, sel["dropped"]), rel=1e-5)
    ex.buttons["clear"].click()
    assert ex.skip == [] and ex.readout()["eq3"] == 0


def test_the_saved_selection_loads_in_stage_II(tiny_bundle_dir, stage1_runs, tmp_path):
    from flgcore.stage2 import Stage2Config, candidate_blocks, run_stage2
    ex = report.explorer(str(tiny_bundle_dir), stage1=stage1_runs / "oneshot", out=tmp_path, skip=[2], debounce=0, **CLIP)
    ex.toggles[3].value = True
    ex.save_path.value = str(tmp_path / "mine.json")
    ex.save()  # what the "save selection" button calls
    sel = json.loads((tmp_path / "mine.json").read_text())
    assert sel["dropped"] == [2, 3] and sel["kept"] == [0, 1] and sel["method"] == "your pick"
    assert sel["retention"] == pytest.approx(retention_of(ex.model, [0, 1]))
    cfg = Stage2Config(model=str(tiny_bundle_dir), selection=str(tmp_path / "mine.json"), out=str(tmp_path / "s2"),
                       steps=2, batch_size=2, warmup=1)
    assert candidate_blocks(cfg, ex.model) == [2, 3]
    run_stage2(cfg)
    assert json.loads((tmp_path / "s2" / "model" / "flgcore.json").read_text())["drop"] == [2, 3]


def test_quick_clicks_are_debounced_into_one_update(tiny_bundle_dir, stage1_runs):
    ex = report.explorer(str(tiny_bundle_dir), stage1=stage1_runs / "oneshot", debounce=0.2, **CLIP)
    calls, update = [], ex.update
    ex.update = lambda: (calls.append(list(ex.skip)), update())[1]
    for i in (0, 2, 3):
        ex.toggles[i].value = True
    assert "updating" in ex.status.value  # the busy state, at once
    for _ in range(200):
        if calls and "updated" in ex.status.value:
            break
        time.sleep(0.05)
    time.sleep(0.3)
    assert calls == [[0, 2, 3]] and "updated in" in ex.status.value


def test_no_library_call_changes_the_plotting_state(tiny_bundle_dir, stage1_runs, tmp_path):
    import matplotlib.pyplot as plt
    from flgcore.importance import plot_importance
    backend, figs = matplotlib.get_backend(), plt.get_fignums()
    by_block = report.importance_tables(stage1_runs / "oneshot")[0]
    plot_importance(by_block, tmp_path / "importance")
    ex = report.explorer(str(tiny_bundle_dir), stage1=stage1_runs / "oneshot", skip=[1], debounce=0, **CLIP)
    bundle = ex._repr_mimebundle_()  # a live frontend shows the widget; papermill and static viewers the PNG
    assert {"application/vnd.jupyter.widget-view+json", "image/png", "text/plain"} <= set(bundle)
    assert bundle["image/png"].startswith("iVBOR")  # base64 PNG
    ex.figure()
    assert matplotlib.get_backend() == backend and plt.get_fignums() == figs
    assert (tmp_path / "importance.png").is_file()


def test_without_a_stage1_run_it_scores_its_own_draws(tiny_bundle_dir):
    ex = report.explorer(str(tiny_bundle_dir), sigmas=[0.5], debounce=0, **CLIP)
    by_t, by_b = summarise(score_blocks(ex.model, ex.batches, "eq4", progress=False), ex.model)
    assert ex.by_block.importance.tolist() == pytest.approx(by_b.sort_values("block").importance.tolist())
    ex.ret_slider.value = 0.5
    ex.buttons["oneshot"].click()
    keep = select_keep(by_b.sort_values("block").importance.tolist(), ex.params, 0.5)
    assert ex.skip == [i for i in range(4) if i not in keep]


def test_a_hunyuan_checkpoint_groups_its_toggles_and_decodes_its_cache(tmp_path):
    """A real-checkpoint layout (pipeline + latent cache): double and single blocks apart, clips from the VAE."""
    import imageio.v2 as imageio
    from flgcore import synth
    from flgcore.cache import CacheConfig, run_cache
    from tiny_pipelines import write_tiny_pipeline
    pipe = write_tiny_pipeline(tmp_path / "pipe", image_conditioned=False, family="hunyuan")
    rows = []
    for i in range(2):
        clip = synth.render(synth.clip_spec(10 + i), frames=9)
        imageio.mimwrite(tmp_path / f"v{i}.mp4", list(((clip.transpose(1, 2, 3, 0) + 1) * 127.5).round().astype(np.uint8)),
                         fps=8, macro_block_size=1)
        rows.append(f"v{i}.mp4,{synth.clip_spec(10 + i).caption}\n")
    (tmp_path / "manifest.csv").write_text("video,caption\n" + "".join(rows))
    run_cache(CacheConfig(pipeline=str(pipe), manifest=str(tmp_path / "manifest.csv"), out=str(tmp_path / "cache"),
                          frames=9, height=32, width=32, shard_size=3, max_sequence_length=8))
    ex = report.explorer(str(pipe), data=str(tmp_path / "cache"), n=2, batch_size=2, sigmas=[0.5], clip_seeds=[0],
                         clip_steps=1, cfg_scale=1.0, debounce=0)
    groups = [b.group for b in ex.blocks]
    assert "double" in groups and "single" in groups
    labels = [row.children[0].value for row in ex.ui.children[1:3]]
    assert labels == ["double blocks", "single blocks"]  # Wan has one kind: "blocks"
    before = ex.clips_img.value
    ex.toggles[groups.index("single")].value = True
    assert ex.clips_img.value != before and ex.real().shape[1] == 3  # decoded RGB clips
    assert ex.readout()["eq3"] == pytest.approx(report.set_error(ex.model, ex.batches, ex.skip), rel=1e-5)


def test_notebooks_write_into_the_repos_runs_whichever_folder_the_kernel_starts_in(tmp_path, monkeypatch):
    from flgcore.notebooks import NOTEBOOK_DIR, at_repo_root
    copy = tmp_path / "repo"
    (copy / "notebooks").mkdir(parents=True)
    (copy / "pyproject.toml").write_text("")
    monkeypatch.chdir(copy / "notebooks")  # where JupyterLab starts a notebook's kernel
    assert at_repo_root() == copy and os.getcwd() == str(copy)
    monkeypatch.chdir(tmp_path)  # outside any checkout: the one flgcore was installed from
    assert at_repo_root() == NOTEBOOK_DIR.parent
