"""Stage III: Eq. 9, the DMD gradient, the frozen real DiT, export round trip, kill -9 resume, bench."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flgcore import flow, synth
from flgcore.bench import BenchConfig, run_bench
from flgcore.models import load_transformer, tiny_model, velocity
from flgcore.config import FlgError
from flgcore.models import flow_matching_loss
from flgcore.runs import latest_checkpoint, load_checkpoint
from flgcore.sampling import SampleSpec, load_bundle, sample_batch
from flgcore.stage3 import (Critics, Stage3Config, dmd_grad, dmd_loss, draw_betas, run_stage3, student_scheduler,
                            student_sigmas, well_guided)
from flgcore.surgery import blocks, prune, skipping

KILLED_RUN = str(Path(__file__).with_name("killed_run.py"))  # `flg`, SIGKILLed after a given step


def _v(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 2, 4, 4, generator=g) for _ in range(n)]


def test_eq9_against_a_direct_computation():
    vpc, vpn, vuc = _v(0)
    b1, b2 = 3.5, 0.25
    direct = b1 * (vpc - vpn) + b2 * (vuc - vpc) + vpn
    torch.testing.assert_close(well_guided(vpc, vpn, vuc, b1, b2), direct)
    # beta2 = 0: plain CFG of the pruned model, whatever the unpruned model says
    torch.testing.assert_close(well_guided(vpc, vpn, vuc * 100, b1, 0.0), flow.cfg_combine(vpc, vpn, b1))
    # beta2 = 1: the unpruned model's conditional term replaces the pruned one (exactly it when beta1 = 1)
    torch.testing.assert_close(well_guided(vpc, vpn, vuc, 1.0, 1.0), vuc)
    torch.testing.assert_close(well_guided(vpc, vpn, vuc, b1, 1.0), vuc + (b1 - 1) * (vpc - vpn))


def test_betas_are_drawn_in_their_ranges():
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([draw_betas(3.5, 0.25, 1.0, 0.1, g) for _ in range(2000)])
    assert draws[:, 0].min() >= 2.5 and draws[:, 0].max() <= 4.5 and abs(draws[:, 0].mean() - 3.5) < 0.05
    assert draws[:, 1].min() >= 0.15 and draws[:, 1].max() <= 0.35
    assert draws[:, 0].max() - draws[:, 0].min() > 1.8  # the jitter is really drawn
    assert draw_betas(2.0, 0.25, 0.0, 0.0, g) == (2.0, 0.25)


def test_dmd_gradient_and_surrogate_loss_identity():
    x, x0_real, x0_fake = _v(1)
    x.requires_grad_(True)
    grad = dmd_grad(x.detach(), x0_real, x0_fake)
    # per-sample normalisation, as DMD2: each sample divided by its own mean |x - x0_real|
    for i in range(2):
        torch.testing.assert_close(grad[i], (x0_fake[i] - x0_real[i]) / (x[i].detach() - x0_real[i]).abs().mean())
    dmd_loss(x, grad).backward()
    torch.testing.assert_close(x.grad, grad / x.numel())  # d/dx 0.5 mean (x - sg(x - g))^2 = g / numel
    # the loss value is half the mean square of the gradient, and zero when fake and real agree
    assert dmd_loss(x, grad).item() == pytest.approx(0.5 * float(grad.pow(2).mean()), rel=1e-5)
    assert dmd_loss(x, dmd_grad(x.detach(), x0_real, x0_real)).item() == 0.0


def test_student_sigmas_are_the_saved_diffusers_schedulers(tmp_path):
    from diffusers import FlowMatchLCMScheduler
    sig = student_sigmas(4, 2.0)
    assert sig[0] == 1.0 and sig[-1] == pytest.approx(float(flow.shift_sigma(0.25, 2.0)))  # DMD2's 249/1000, shifted
    assert sig == sorted(sig, reverse=True) and len(set(sig)) == 4
    assert student_sigmas(1, 2.0) == [1.0]
    student_scheduler(4, 2.0).save_pretrained(tmp_path)
    sch = FlowMatchLCMScheduler.from_pretrained(tmp_path)
    sch.set_timesteps(4)  # what a diffusers pipeline does with num_inference_steps=4
    assert sch.sigmas[:-1].tolist() == pytest.approx(sig)


def _batch(bundle, n=2, seed=0):
    x0, specs = synth.clips(list(range(seed, seed + n)))
    cond = synth.make_cond(bundle.encoder, x0, [s.caption for s in specs])
    g = torch.Generator().manual_seed(seed)
    return x0, cond, synth.null_cond(bundle.encoder, cond), torch.randn(x0.shape, generator=g), torch.rand(n, generator=g) * 0.8 + 0.1


@pytest.mark.parametrize("kind,overrides", [("hunyuan", {}), ("wan-i2v", dict(image_dim=8, added_kv_proj_dim=24))],
                         ids=["hunyuan", "wan-i2v-clip"])
def test_the_lora_fake_dit_adapts_the_block_linears_and_nothing_else(kind, overrides):
    model = tiny_model(kind, **overrides)
    Critics(model, drop=[], fake="lora", teacher="pruned", lora_rank=2)
    adapted = {n.split(".lora_A.")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    in_blocks = ("blocks.", "transformer_blocks.", "single_transformer_blocks.")
    assert adapted and all(n.startswith(in_blocks) and ".norm" not in n for n in adapted), sorted(adapted)
    if kind == "hunyuan":  # the text stream's attention and the single blocks' fused MLP, as well as the rest
        assert {"transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.to_add_out",
                "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"} <= adapted
    else:  # Wan 2.1 I2V's keys and values of the CLIP image tokens
        assert {"blocks.0.attn2.add_k_proj", "blocks.0.attn2.add_v_proj", "blocks.0.ffn.net.2"} <= adapted


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_real_dit_is_frozen_and_the_fake_dit_learns(tiny_stage2_dir, mode):
    bundle = load_bundle(tiny_stage2_dir)
    model = bundle.model
    x0, cond, null, eps, s = _batch(bundle)
    x_s = flow.add_noise(x0, eps, s)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), skipping(model, [1, 2]):
        v_drop = velocity(model, x_s, s, cond)
    critics = Critics(model, [1, 2], mode, "pruned", lora_rank=4)
    torch.testing.assert_close(critics.fake_velocity(x_s, s, cond), v_drop)  # the fake DiT starts as the drop view
    real_before = critics.real_velocity(x_s, s, cond, null, 3.5, 0.25)
    assert real_before.grad_fn is None
    opt = torch.optim.AdamW(critics.fake_parameters(), lr=1e-2)
    for _ in range(3):
        with critics.fake_view() as fake:
            loss = flow_matching_loss(fake, x0, eps, s, cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora" not in n)
    after = {k: v for k, v in model.state_dict().items() if "lora" not in k}
    assert all(torch.equal(base[k.replace("base_layer.", "")], after[k]) for k in after)
    torch.testing.assert_close(critics.real_velocity(x_s, s, cond, null, 3.5, 0.25), real_before)
    assert (critics.fake_velocity(x_s, s, cond) - v_drop).abs().max() > 1e-4
    if mode == "lora":
        assert critics.fake_model is model  # one copy of the big weights serves all three


def _cfg(model, out, **kw):
    base = dict(model=str(model), out=str(out), steps=4, batch_size=2, fake_updates=2, ckpt_every=2, log_every=1,
                warmup=1, seed=3, lora_rank=4, student_steps=2, lr=1e-3, fake_lr=1e-3)
    base.update(kw)
    return Stage3Config(**base)


def test_stage3_exports_a_smaller_student_that_round_trips(tiny_stage2_dir, tmp_path):
    from diffusers import FlowMatchLCMScheduler
    m = run_stage3(_cfg(tiny_stage2_dir, tmp_path))
    meta = json.loads((tmp_path / "student" / "flgcore.json").read_text())
    assert meta["sampler"] == "fewstep" and meta["keep"] == [0, 3] and meta["cfg_scale"] == 1.0
    assert len(meta["sigmas"]) == 2 and "drop" not in meta
    assert meta["diffusers_scheduler"] is True
    sch = FlowMatchLCMScheduler.from_pretrained(tmp_path / "student" / "scheduler")
    sch.set_timesteps(len(meta["sigmas"]))
    assert sch.sigmas[:-1].tolist() == pytest.approx(meta["sigmas"])
    student = load_transformer(tmp_path / "student" / "transformer")
    assert student.config.num_layers == 2 and len(blocks(student)) == 2
    # the exported weights are the last checkpoint's student, exactly
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    ref = prune(load_bundle(tiny_stage2_dir).model, [0, 3])
    ref.load_state_dict(ck["student"]["weights"])
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in ref.state_dict().items())
    # and it samples with its saved schedule and nothing else
    b = load_bundle(tmp_path / "student")
    spec = SampleSpec().resolve(b.meta)
    assert spec.nfe() == 2
    x0, specs = synth.clips([5])
    clip = sample_batch(b, spec, x0[:, :, 0], [specs[0].caption], [5])
    assert clip.shape == x0.shape and torch.isfinite(clip).all()
    log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and "dmd_loss" in log[0] and "dmd_loss" not in log[1]
    assert m["memory"]["total_bytes"] > 0


def test_lora_mode_holds_less_memory_than_full_copies(tiny_stage2_dir, tmp_path):
    lora = run_stage3(_cfg(tiny_stage2_dir, tmp_path / "lora", steps=1))["memory"]
    full = run_stage3(_cfg(tiny_stage2_dir, tmp_path / "full", steps=1, fake="full"))["memory"]
    assert lora["param_bytes"] < full["param_bytes"] and lora["optimizer_bytes"] < full["optimizer_bytes"]


def test_plain_dmd2_and_the_unpruned_teacher_run_from_the_same_code(tiny_stage2_dir, tmp_path):
    m = run_stage3(_cfg(tiny_stage2_dir, tmp_path / "dmd2", retention=1.0, beta2=0.0, beta2_range=0.0, steps=2))
    assert m["drop"] == [] and m["retention"] == 1.0
    assert load_transformer(tmp_path / "dmd2" / "student" / "transformer").config.num_layers == 4
    m = run_stage3(_cfg(tiny_stage2_dir, tmp_path / "strong", teacher="unpruned", steps=2))
    assert m["teacher"] == "unpruned" and m["keep"] == [0, 3]


@pytest.mark.parametrize("share", [True, 0.5])
def test_gradient_checkpointing_changes_no_number(tiny_stage2_dir, tmp_path, share):
    # the fake DiT's backward re-runs its blocks: it must happen with the LoRA adapter still switched on
    run_stage3(_cfg(tiny_stage2_dir, tmp_path / "plain", steps=2, fake_updates=1))
    run_stage3(_cfg(tiny_stage2_dir, tmp_path / "ckpt", steps=2, fake_updates=1, grad_checkpointing=share))
    rows = [[json.loads(l) for l in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in ("plain", "ckpt")]
    assert rows[0][-1]["fake_loss"] == pytest.approx(rows[1][-1]["fake_loss"], rel=1e-5)
    a, b = (load_transformer(tmp_path / r / "student" / "transformer") for r in ("plain", "ckpt"))
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_compiled_blocks_train_as_the_eager_ones(tiny_stage2_dir, tmp_path, monkeypatch):
    """compile=true compiles the student's blocks and the shared weights' (real DiT and LoRA fake DiT), after
    the student was cut from them, and trains to the eager numbers."""
    import flgcore.train
    from flgcore.surgery import compile_blocks
    compiled = []
    monkeypatch.setattr(flgcore.train, "compile_blocks", lambda m: compiled.append(compile_blocks(m)))
    run_stage3(_cfg(tiny_stage2_dir, tmp_path / "eager", steps=2, fake_updates=1))
    run_stage3(_cfg(tiny_stage2_dir, tmp_path / "compiled", steps=2, fake_updates=1, compile=True))
    assert compiled == [2, 4]  # the 2-block student, the 4-block shared model
    rows = [[json.loads(l) for l in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in ("eager", "compiled")]
    assert rows[0][-1]["fake_loss"] == pytest.approx(rows[1][-1]["fake_loss"], rel=1e-3)
    a, b = (load_transformer(tmp_path / r / "student" / "transformer") for r in ("eager", "compiled"))
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5)


def test_bf16_trains_fp32_master_weights(tiny_stage2_dir, tmp_path):
    """precision=bf16 without ZeRO: every forward under bf16 autocast, the student's fp32 weights move as
    under fp32 (as bf16 weights they would not: the paper's lr 5e-7 is far under half a bf16 ulp)."""
    init = load_transformer(tiny_stage2_dir / "transformer").state_dict()
    delta, rows = {}, {}
    for precision in ("fp32", "bf16"):
        m = run_stage3(_cfg(tiny_stage2_dir, tmp_path / precision, steps=2, fake_updates=1, lr=1e-5, precision=precision))
        student = load_transformer(tmp_path / precision / "student" / "transformer").state_dict()
        delta[precision] = torch.cat([(student[f"blocks.{i}.{k[len(f'blocks.{b}.'):]}"] - init[k]).flatten()
                                      for i, b in enumerate(m["keep"]) for k in init if k.startswith(f"blocks.{b}.")])
        rows[precision] = [json.loads(l) for l in (tmp_path / precision / "log.jsonl").read_text().splitlines()]
    assert (delta["fp32"] != 0).float().mean() > 0.9 and (delta["bf16"] != 0).float().mean() > 0.9
    cos = torch.nn.functional.cosine_similarity(delta["fp32"], delta["bf16"], dim=0)
    assert cos > 0.9, f"bf16 updates point elsewhere than fp32's (cosine {cos:.3f})"
    a, b = rows["fp32"][-1]["fake_loss"], rows["bf16"][-1]["fake_loss"]
    assert a != b and a == pytest.approx(b, rel=0.05)  # bf16 matmuls did run, to nearly the fp32 numbers


def test_kill_minus_9_and_resume_gives_identical_weights(tiny_stage2_dir, tmp_path):
    args = ["stage3", f"model={tiny_stage2_dir}", f"out={tmp_path / 'killed'}",
            "steps=4", "batch_size=2", "fake_updates=2", "ckpt_every=2", "log_every=1", "warmup=1", "seed=3",
            "lora_rank=4", "student_steps=2", "lr=1e-3", "fake_lr=1e-3"]
    # the straight run through the same command line, so that both runs set torch up alike (an in-process run
    # can differ from a CLI one in the last bit of a few weights)
    straight = [a if not a.startswith("out=") else f"out={tmp_path / 'straight'}" for a in args]
    assert subprocess.run([sys.executable, "-m", "flgcore.cli", *straight], capture_output=True).returncode == 0
    r = subprocess.run([sys.executable, KILLED_RUN, "3", *args], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "flgcore.cli", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stdout
    a = load_transformer(tmp_path / "straight" / "student" / "transformer").state_dict()
    b = load_transformer(tmp_path / "killed" / "student" / "transformer").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    fa = load_checkpoint(latest_checkpoint(tmp_path / "straight"))["fake"]["weights"]
    fb = load_checkpoint(latest_checkpoint(tmp_path / "killed"))["fake"]["weights"]
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def test_clear_errors(tiny_stage2_dir, tiny_bundle_dir, tmp_path):
    with pytest.raises(FlgError, match="teacher must be"):
        run_stage3(_cfg(tiny_stage2_dir, tmp_path / "r", teacher="strongest"))
    with pytest.raises(FlgError, match="fake must be"):
        run_stage3(_cfg(tiny_stage2_dir, tmp_path / "r", fake="half"))
    with pytest.raises(FlgError, match="no saved drop set"):
        run_stage3(_cfg(tiny_bundle_dir, tmp_path / "r"))
    with pytest.raises(FlgError, match="retention 0.9 does not match"):
        run_stage3(_cfg(tiny_stage2_dir, tmp_path / "r", retention=0.9))
    with pytest.raises(FlgError, match="sigmas must be decreasing"):
        run_stage3(_cfg(tiny_stage2_dir, tmp_path / "r", sigmas=[0.5, 0.9]))
    with pytest.raises(FlgError, match="attention must be a diffusers attention backend, got 'fastest'"):
        run_stage3(_cfg(tiny_stage2_dir, tmp_path / "r", attention="fastest"))
    with pytest.raises(FlgError, match="attention=flash: .*flash-attn"):  # a kernel this machine does not have
        run_stage3(_cfg(tiny_stage2_dir, tmp_path / "r", attention="flash"))
    with pytest.raises(FlgError, match="compile=true is not supported with zero=true"):
        run_stage3(_cfg(tiny_stage2_dir, tmp_path / "r", zero=True, compile=True))
    with pytest.raises(FlgError, match="precision must be fp32 or bf16, got 'fp16'"):
        run_stage3(_cfg(tiny_stage2_dir, tmp_path / "r", precision="fp16"))
    assert not (tmp_path / "r").exists()


def test_time_methods_times_every_method_alike_and_counts_only_the_blocks_run(tiny_bundle_dir, tiny_stage2_dir):
    from flgcore.bench import time_methods
    from flgcore.surgery import blocks
    from flgcore.sampling import load_bundle
    df = time_methods({"teacher": dict(model=str(tiny_bundle_dir), steps=3, cfg_scale=2.0),
                       "pruned": dict(model=str(tiny_stage2_dir), view="drop", steps=3, cfg_scale=2.0)},
                      n=1, repeats=1, warmup=0)
    params = [b.params for b in blocks(load_bundle(tiny_stage2_dir).model)]
    assert list(df.index) == ["teacher", "pruned"] and list(df["blocks"]) == [4, 2]
    assert df.loc["pruned", "block_params"] == sum(params) - params[1] - params[2]  # the drop set is blocks 1, 2
    assert df.loc["teacher", "nfe"] == df.loc["pruned", "nfe"] == 6
    assert df.loc["teacher", "theoretical_speedup"] == 1.0 and df.loc["teacher", "measured_speedup"] == 1.0
    assert df.loc["pruned", "theoretical_speedup"] == pytest.approx(sum(params) / (sum(params) - params[1] - params[2]))
    with pytest.raises(FlgError, match=r"teacher \(.*\) has no saved drop set"):
        time_methods({"teacher": dict(model=str(tiny_bundle_dir), view="drop")}, n=1, repeats=1)


def test_bench_reports_theoretical_and_measured_speedup(tiny_bundle_dir, tiny_stage2_dir, tmp_path):
    run_stage3(_cfg(tiny_stage2_dir, tmp_path / "s3", steps=1))
    r = run_bench(BenchConfig(teacher=str(tiny_bundle_dir), student=str(tmp_path / "s3" / "student"),
                              out=str(tmp_path / "bench"), n=2, repeats=2, warmup=0, teacher_steps=4))
    t, s = r["teacher"], r["student"]
    assert t["nfe"] == 8 and s["nfe"] == 2  # 4 Euler steps x (cond + null) vs 2 student steps
    assert r["theoretical_speedup"] == pytest.approx(8 * t["block_params"] / (2 * s["block_params"]))
    assert r["measured_speedup"] == pytest.approx(t["sec_per_clip"] / s["sec_per_clip"])
    assert (tmp_path / "bench" / "bench.csv").is_file()
    with pytest.raises(FlgError, match="not a few-step student"):
        run_bench(BenchConfig(teacher=str(tiny_bundle_dir), student=str(tiny_bundle_dir), out=str(tmp_path / "b2")))


def test_an_unpruned_model_of_its_own_serves_eq_9(tiny_stage2_dir, tiny_bundle_dir, tmp_path):
    """unpruned=<model>: Eq. 9's unpruned term comes from that model: the same weights give the same teacher,
    other weights (the model before Stage II) another one, and a run with it trains."""
    import copy
    bundle = load_bundle(tiny_stage2_dir)
    x0, cond, null, eps, s = _batch(bundle)
    x_s = flow.add_noise(x0, eps, s)
    model = bundle.model
    plain = Critics(copy.deepcopy(model), [1, 2], "full", "pruned", 4).real_velocity(x_s, s, cond, null, 3.5, 0.25)
    same = Critics(copy.deepcopy(model), [1, 2], "full", "pruned", 4, unpruned=copy.deepcopy(model))
    torch.testing.assert_close(same.real_velocity(x_s, s, cond, null, 3.5, 0.25), plain)
    other = Critics(copy.deepcopy(model), [1, 2], "full", "pruned", 4, unpruned=load_bundle(tiny_bundle_dir).model)
    assert not torch.allclose(other.real_velocity(x_s, s, cond, null, 3.5, 0.25), plain)
    m = run_stage3(_cfg(tiny_stage2_dir, tmp_path, steps=2, unpruned=str(tiny_bundle_dir)))
    assert m["steps"] == 2
