"""Stage II: the loss against Eqs. 5-7, the stop-gradient, kill -9 resume, clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flgcore.evaluate import EvalConfig, run_eval
from flgcore.models import load_transformer
from flgcore.config import FlgError
from flgcore.stage2 import Stage2Config, draw_drop, run_stage2, stage2_loss

KILLED_RUN = str(Path(__file__).with_name("killed_run.py"))  # `flg`, SIGKILLed after a given step


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 2, 4, 4, generator=g) for _ in range(4)]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_loss_matches_eqs_5_to_7(alpha):
    v_drop, v_full, x0, eps = _tensors()
    target = eps - x0  # diffusers' sign (the paper's x0 - x1 is a slip)
    distill = ((v_drop - v_full) ** 2).mean()                                   # Eq. 6
    training = ((v_drop - target) ** 2).mean() + ((v_full - target) ** 2).mean()  # Eq. 5
    loss, parts = stage2_loss(v_drop, v_full, x0, eps, alpha)
    torch.testing.assert_close(loss, alpha * distill + (1 - alpha) * training)   # Eq. 7
    assert parts["distill"] == pytest.approx(float(distill))


@pytest.mark.parametrize("alpha,full_gets_grad", [(1.0, False), (0.5, True), (0.0, True)])
def test_stop_gradient_into_the_full_view(alpha, full_gets_grad):
    v_drop, v_full, x0, eps = _tensors(1)
    v_drop.requires_grad_(True)
    v_full.requires_grad_(True)
    stage2_loss(v_drop, v_full, x0, eps, alpha)[0].backward()
    assert (v_full.grad is not None and v_full.grad.abs().sum() > 0) == full_gets_grad
    assert v_drop.grad.abs().sum() > 0


def test_drop_modes():
    g = torch.Generator().manual_seed(0)
    draws = [draw_drop([2, 3, 5], 0.5, "whole_set", g) for _ in range(200)]
    assert {tuple(d) for d in draws} == {(), (2, 3, 5)}
    draws = [tuple(draw_drop([2, 3, 5], 0.5, "per_block", g)) for _ in range(400)]
    assert len(set(draws)) == 8  # every subset appears
    with pytest.raises(FlgError, match="drop_mode"):
        draw_drop([1], 0.5, "sometimes", g)


def _cfg(model, out, **kw):
    base = dict(model=str(model), out=str(out), drop=[1, 2], steps=4, batch_size=2, ckpt_every=2, log_every=1,
                warmup=1, seed=3)
    base.update(kw)
    return Stage2Config(**base)


def test_stage2_trains_the_drop_view_toward_the_full_view(tiny_bundle_dir, tmp_path):
    m = run_stage2(_cfg(tiny_bundle_dir, tmp_path, steps=6, lr=1e-3))
    meta = json.loads((tmp_path / "model" / "flgcore.json").read_text())
    assert meta["drop"] == [1, 2] and meta["keep"] == [0, 3] and meta["kind"] == "stage2"
    log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and m["steps"] == 6
    for view in ("drop", "full"):  # flg eval works on both views of the Stage-II model
        agg = run_eval(EvalConfig(model=str(tmp_path / "model"), out=str(tmp_path / f"eval_{view}"), n=2, steps=2,
                                  view=view, videos=0))
        assert agg["dropped_blocks"] == (2 if view == "drop" else 0)


def test_kill_minus_9_and_resume_gives_identical_weights(tiny_bundle_dir, tmp_path):
    args = ["stage2", f"model={tiny_bundle_dir}", f"out={tmp_path / 'killed'}",
            "drop=[1, 2]", "steps=4", "batch_size=2", "ckpt_every=2", "log_every=1", "warmup=1", "seed=3"]
    # the straight run through the same command line, so that both runs set torch up alike (an in-process run
    # can differ from a CLI one in the last bit of a few weights)
    straight = [a if not a.startswith("out=") else f"out={tmp_path / 'straight'}" for a in args]
    assert subprocess.run([sys.executable, "-m", "flgcore.cli", *straight], capture_output=True).returncode == 0
    r = subprocess.run([sys.executable, KILLED_RUN, "3", *args], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]
    assert not (tmp_path / "killed" / "model").exists()
    r = subprocess.run([sys.executable, "-m", "flgcore.cli", *args], capture_output=True, text=True)  # the same again
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stdout
    a = load_transformer(tmp_path / "straight" / "model" / "transformer").state_dict()
    b = load_transformer(tmp_path / "killed" / "model" / "transformer").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_attention_backend_changes_the_kernel_not_the_training(tiny_bundle_dir, tmp_path, monkeypatch):
    """attention=_native_math (torch's reference kernel) reaches every attention processor and logs the
    losses of the default SDPA path."""
    import flgcore.stage2
    from flgcore.models import set_attention
    seen = []

    def spy(model, backend):
        set_attention(model, backend)
        seen.append({str(getattr(m.processor, "_attention_backend", None)) for m in model.modules() if hasattr(m, "processor")})
    monkeypatch.setattr(flgcore.stage2, "set_attention", spy)
    run_stage2(_cfg(tiny_bundle_dir, tmp_path / "native"))
    run_stage2(_cfg(tiny_bundle_dir, tmp_path / "math", attention="_native_math"))
    assert seen == [{"None"}, {"AttentionBackendName._NATIVE_MATH"}]
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    assert _AttentionBackendRegistry.get_active_backend()[0] == "native"  # models loaded later are untouched
    logs = [[json.loads(l)["loss"] for l in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in ("native", "math")]
    assert logs[0] == pytest.approx(logs[1], rel=1e-4)


def test_compiled_blocks_train_as_the_eager_ones(tiny_bundle_dir, tmp_path, monkeypatch):
    """compile=true compiles every block of the model (inductor on the CPU here) and logs the eager losses."""
    import flgcore.train
    from flgcore.surgery import compile_blocks
    compiled = []
    monkeypatch.setattr(flgcore.train, "compile_blocks", lambda m: compiled.append(compile_blocks(m)))
    run_stage2(_cfg(tiny_bundle_dir, tmp_path / "eager", steps=3))
    run_stage2(_cfg(tiny_bundle_dir, tmp_path / "compiled", steps=3, compile=True))
    assert compiled == [4]
    logs = [[json.loads(l)["loss"] for l in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in ("eager", "compiled")]
    assert logs[0] == pytest.approx(logs[1], rel=1e-3)


def test_bf16_moves_the_weights_as_fp32_does_at_the_papers_lr(tiny_bundle_dir, tmp_path):
    """precision=bf16 is autocast over fp32 master weights. Pure bf16 weights would lose the updates: at
    lr 1e-5 an Adam step is under half a bf16 ulp of any weight above 2^-8 and rounds away."""
    init = load_transformer(tiny_bundle_dir / "transformer").state_dict()
    delta = {}
    for precision in ("fp32", "bf16"):
        run_stage2(_cfg(tiny_bundle_dir, tmp_path / precision, lr=1e-5, precision=precision))
        trained = load_transformer(tmp_path / precision / "model" / "transformer").state_dict()
        delta[precision] = torch.cat([(trained[k] - init[k]).flatten() for k in init if k.startswith("blocks.")])
    moved = delta["fp32"] != 0  # the kept blocks' weights (the dropped ones get no gradient at alpha 1, p 1)
    assert moved.sum() > 1000 and (delta["bf16"][moved] != 0).float().mean() > 0.9
    cos = torch.nn.functional.cosine_similarity(delta["fp32"], delta["bf16"], dim=0)
    assert cos > 0.9, f"bf16 updates point elsewhere than fp32's (cosine {cos:.3f})"
    ratio = delta["bf16"].norm() / delta["fp32"].norm()
    assert 0.8 < ratio < 1.25, f"bf16 moved the weights {ratio:.2f}x as far as fp32"
    losses = [[json.loads(l)["loss"] for l in (tmp_path / p / "log.jsonl").read_text().splitlines()] for p in ("fp32", "bf16")]
    assert losses[0] != losses[1] and losses[0] == pytest.approx(losses[1], rel=0.05)  # bf16 matmuls did run


def test_non_finite_loss_stops_with_the_step(tiny_bundle_dir, tmp_path):
    with pytest.raises(FlgError, match=r"non-finite loss .* at step \d+"):
        run_stage2(_cfg(tiny_bundle_dir, tmp_path, lr=1e20, grad_clip=1e30, steps=6, ckpt_every=1))
    assert any((tmp_path / "checkpoints").iterdir())


def test_keep_set_that_does_not_match_the_model(tiny_bundle_dir, tmp_path):
    sel = tmp_path / "selection.json"
    sel.write_text(json.dumps({"kept": [0, 1, 2, 3, 4, 5], "dropped": [6, 7]}))
    with pytest.raises(FlgError, match="the model has 4 blocks"):
        run_stage2(_cfg(tiny_bundle_dir, tmp_path / "r", drop=[], selection=str(sel)))
    with pytest.raises(FlgError, match="out of range"):
        run_stage2(_cfg(tiny_bundle_dir, tmp_path / "r", drop=[1, 9]))
    with pytest.raises(FlgError, match="no candidate blocks"):
        run_stage2(_cfg(tiny_bundle_dir, tmp_path / "r", drop=[]))
    with pytest.raises(FlgError, match="grad_checkpointing .* got 2.0"):
        run_stage2(_cfg(tiny_bundle_dir, tmp_path / "r", grad_checkpointing=2.0))
    with pytest.raises(FlgError, match="attention must be a diffusers attention backend, got 'fastest'"):
        run_stage2(_cfg(tiny_bundle_dir, tmp_path / "r", attention="fastest"))
    with pytest.raises(FlgError, match="compile=true is not supported with zero=true"):
        run_stage2(_cfg(tiny_bundle_dir, tmp_path / "r", zero=True, compile=True))
    assert not (tmp_path / "r").exists()


def test_x0_models_cap_the_low_noise_weight():
    from flgcore.stage2 import loss_weight
    v_drop, v_full, x0, eps = _tensors(2)
    s = torch.tensor([0.01, 0.5])
    model = torch.nn.Linear(1, 1)
    assert loss_weight(model, s, 0.05) is None  # v-predicting: Eqs. 5-7 as written
    model.flg_prediction = "x0"
    w = loss_weight(model, s, 0.05)
    torch.testing.assert_close(w, torch.tensor([0.2, 1.0]))
    loss, _ = stage2_loss(v_drop, v_full, x0, eps, 1.0, w)
    direct = ((v_drop - v_full) * w.reshape(-1, 1, 1, 1, 1)).pow(2).mean()
    torch.testing.assert_close(loss, direct)


def test_a_teacher_replaces_the_full_view_as_distillation_target():
    v_drop, v_full, x0, eps = _tensors(2)
    v_teacher = _tensors(3)[0]
    loss, parts = stage2_loss(v_drop, None, x0, eps, 1.0, v_teacher=v_teacher)
    torch.testing.assert_close(loss, ((v_drop - v_teacher) ** 2).mean())
    target = eps - x0
    loss, _ = stage2_loss(v_drop, v_full, x0, eps, 0.5, v_teacher=v_teacher)
    training = ((v_drop - target) ** 2).mean() + ((v_full - target) ** 2).mean()
    torch.testing.assert_close(loss, 0.5 * ((v_drop - v_teacher) ** 2).mean() + 0.5 * training)


def test_a_frozen_target_is_unchanged_by_training(tiny_bundle_dir, tmp_path, monkeypatch):
    import flgcore.stage2
    copies = []
    real = flgcore.stage2.frozen_copy
    monkeypatch.setattr(flgcore.stage2, "frozen_copy", lambda m: copies.append(real(m)) or copies[-1])
    run_stage2(_cfg(tiny_bundle_dir, tmp_path, steps=3, lr=1e-3, alpha=1.0, p=1.0, target="frozen"))
    init = load_transformer(tiny_bundle_dir / "transformer").state_dict()
    trained = load_transformer(tmp_path / "model" / "transformer").state_dict()
    (frozen,) = copies
    assert all(torch.equal(v, init[k]) for k, v in frozen.state_dict().items())
    assert any(not torch.equal(v, init[k]) for k, v in trained.items())
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(r["distill"] > 0 for r in log)  # at step 1 too: the frozen model's full view is not the drop view
    with pytest.raises(FlgError, match="target"):
        run_stage2(_cfg(tiny_bundle_dir, tmp_path / "bad", target="moving"))


def test_p_one_trains_the_drop_view_every_step(tiny_bundle_dir, tmp_path):
    run_stage2(_cfg(tiny_bundle_dir, tmp_path, steps=4, p=1.0))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["n_dropped"] for r in log] == [2, 2, 2, 2]


def test_full_distill_adds_the_full_views_distance_to_the_teacher():
    g = torch.Generator().manual_seed(0)
    v_drop, v_full, v_teacher, x0, eps = (torch.randn(2, 3, 2, 4, 4, generator=g) for _ in range(5))
    loss, parts = stage2_loss(v_drop, v_full, x0, eps, 1.0, v_teacher=v_teacher, full_distill=True)
    want = ((v_drop - v_teacher) ** 2).mean() + ((v_full - v_teacher) ** 2).mean()
    assert torch.allclose(loss, want) and parts["distill"] == pytest.approx(float(want))


def test_views_both_trains_both_views_every_step(tiny_bundle_dir, tmp_path):
    run_stage2(_cfg(tiny_bundle_dir, tmp_path, steps=4, p=0.01, alpha=1.0, target="frozen", views="both"))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["n_dropped"] for r in log] == [2, 2, 2, 2]  # p is not used: the whole set every step
    with pytest.raises(FlgError, match="views"):
        run_stage2(_cfg(tiny_bundle_dir, tmp_path / "bad", views="all"))
