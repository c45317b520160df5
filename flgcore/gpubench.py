"""`flg bench --gpu`: Stages II-III step cost and teacher-vs-student inference on a random-init Wan at a real size.

No weights are needed: the architecture is built from its published config (`PRESETS`) with random
weights, which costs exactly what the trained model costs. Measured, per setting (with and without
gradient checkpointing on a share of the blocks): median step time over `repeats` (after `warmup`), peak GPU memory, and model
FLOP utilisation = FLOPs counted by `torch.utils.flop_counter` for one step / step time / `peak_tflops`
(989 dense bf16 TFLOP/s for an H100 SXM). Training runs as Stages II-III do on one GPU with
`precision: bf16`: fp32 master weights and AdamW states, bf16 autocast (`runs.autocast`). Inference: bf16
weights, the teacher's 50 Euler steps with CFG on all blocks against the student's 4 steps without CFG on
the kept blocks.
`blocks` builds only that many blocks (e.g. 2 of the 14B configuration: its per-block cost at the same
token count); the table says so. Nothing here runs in CI except the `tiny` preset on the CPU.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import flow
from .config import save_config
from .models import Cond, check_attention, set_attention, velocity
from .config import FlgError
from .runs import autocast, setup_torch, write_json
from .surgery import (blocks, checkpoint_blocks, checkpoint_share, checkpointed, compile_blocks, complement, prune,
                      set_checkpointing, skipping)

_WAN = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
            freq_dim=256, qk_norm="rms_norm_across_heads", cross_attn_norm=True, eps=1e-6)
PRESETS = {  # diffusers WanTransformer3DModel configs of the released checkpoints (random weights here)
    "wan2.1-1.3b": dict(_WAN, num_layers=30, num_attention_heads=12, ffn_dim=8960),
    "wan2.1-14b": dict(_WAN, num_layers=40, num_attention_heads=40, ffn_dim=13824),
    "tiny": dict(patch_size=(1, 2, 2), attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
                 freq_dim=16, qk_norm="rms_norm_across_heads", num_layers=10, num_attention_heads=2, ffn_dim=32),
}


@dataclass
class GpuBenchConfig:
    preset: str = "wan2.1-1.3b"
    blocks: int | None = None      # build only this many blocks (per-block cost of a model too big to build whole)
    frames: int = 81               # video frames -> latent frames (frames - 1) // 4 + 1
    height: int = 480
    width: int = 832
    text_len: int = 512
    batch_size: int = 1            # per GPU, as in the paper
    retention: float = 0.7         # the student / drop view keeps this share of blocks
    teacher_steps: int = 50
    teacher_cfg: float = 5.0
    student_steps: int = 4
    lora_rank: int = 64
    what: list[str] = field(default_factory=lambda: ["stage2", "stage3", "inference"])  # + "eval" (throughput)
    eval_prompts: int = 4          # "eval": prompts, each sampled eval_per_prompt times (seeds batched by flg eval)
    eval_per_prompt: int = 2
    checkpointing: list[bool | float] = field(default_factory=lambda: [0.0, 0.5, 1.0])  # share of blocks recomputed
    attention: list[str] = field(default_factory=lambda: ["native"])  # diffusers backends, e.g. [native, _native_cudnn]
    compile: list[bool] = field(default_factory=lambda: [False])  # training steps with every block torch.compiled too
    repeats: int = 3
    warmup: int = 1
    peak_tflops: float = 989.0     # H100 SXM dense bf16
    device: str = "cuda"
    out: str = "runs/bench-gpu"


def build(cfg: GpuBenchConfig):
    from diffusers import WanTransformer3DModel
    if cfg.preset not in PRESETS:
        raise FlgError(f"unknown preset {cfg.preset!r}; one of {', '.join(PRESETS)}")
    arch = dict(PRESETS[cfg.preset])
    if cfg.blocks:
        arch["num_layers"] = cfg.blocks
    torch.manual_seed(0)
    with torch.device(cfg.device):
        return WanTransformer3DModel(**arch).float()


def inputs(cfg: GpuBenchConfig, model):
    c = model.config
    f, h, w = (cfg.frames - 1) // 4 + 1, cfg.height // 8, cfg.width // 8
    g = torch.Generator(cfg.device).manual_seed(0)
    x = torch.randn(cfg.batch_size, c.out_channels, f, h, w, device=cfg.device, generator=g)
    text = torch.randn(cfg.batch_size, cfg.text_len, c.text_dim, device=cfg.device, generator=g)
    tokens = f * (h // c.patch_size[1]) * (w // c.patch_size[2])
    return x, torch.full((cfg.batch_size,), 0.6, device=cfg.device), Cond(text=text), tokens


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def count_flops(make, cfg: GpuBenchConfig, model, modules=()) -> float:
    """Model FLOPs of one call of `make(x, s, cond)` at the benchmark's size, from exact counts at 1, 2 and 3
    latent frames. A DiT's FLOPs are a quadratic in the token count T (linear layers ~T, self-attention
    ~T^2), so three small counts fix it exactly. Counting at full size is not an option: the counter keeps
    the activations that gradient checkpointing drops (measured: an OOM at 78 GiB for a step that peaks at
    23 GiB uncounted). Checkpointing is off while counting: MFU counts model FLOPs, not recomputation."""
    from dataclasses import replace
    from torch.utils.flop_counter import FlopCounterMode
    mods = [model, *modules]
    was = [checkpointed(m) for m in mods]
    for m in mods:
        set_checkpointing(m, 0)
    pts = []
    for f in (1, 2, 3):
        x, s, cond, tokens = inputs(replace(cfg, frames=4 * (f - 1) + 1), model)
        fn = make(x, s, cond)
        with FlopCounterMode(display=False) as fc:
            fn()
        pts.append((tokens, fc.get_total_flops()))
    for m, w in zip(mods, was):
        checkpoint_blocks(m, w)
    t = torch.tensor([[1.0, n, n * n] for n, _ in pts], dtype=torch.float64)
    coef = torch.linalg.solve(t, torch.tensor([float(c) for _, c in pts], dtype=torch.float64))
    n = inputs(cfg, model)[3]
    return float(coef[0] + coef[1] * n + coef[2] * n * n)


def measure(fn, flops: float, cfg: GpuBenchConfig, label: str) -> dict:
    """Median seconds of fn() over repeats (after warmup) and peak memory; MFU from `flops` (count_flops).
    A setting that does not fit in GPU memory is a row too (sec nan, oom True), not the end of the run."""
    try:
        for _ in range(cfg.warmup):
            fn()
        if cfg.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in tqdm(range(cfg.repeats), desc=label, dynamic_ncols=True):
            _sync(cfg.device); t0 = time.perf_counter()
            fn()
            _sync(cfg.device); times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError as e:
        print(f"{label}: {str(e).splitlines()[0]}")
        return dict(sec=float("nan"), tflops=flops / 1e12, mfu=float("nan"), peak_gib=float("nan"), oom=True)
    sec = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cfg.device.startswith("cuda") else float("nan")
    return dict(sec=sec, tflops=flops / 1e12, mfu=flops / sec / (cfg.peak_tflops * 1e12), peak_gib=peak, oom=False)


def stage2_step_fn(cfg, model, drop, x, s, cond):
    """One Stage-II step at alpha = 1 with the whole candidate set dropped (the heavier half of its draws):
    full view without grad, drop view with grad, AdamW on fp32 master weights."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=cfg.device.startswith("cuda"))

    def step():
        with autocast("bf16", cfg.device):
            with torch.no_grad():
                v_full = velocity(model, x, s, cond)
            with skipping(model, drop):
                v_drop = velocity(model, x, s, cond)
        loss = (v_drop.float() - v_full.float()).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def stage3_step_fn(cfg, shared, student, critics, x, s, cond):
    """One Stage-III student turn (k = 0, beta2 != 0): student forward, Eq. 9 (3 calls of the shared weights),
    fake DiT, DMD backward into the student; then one fake-DiT (LoRA) update."""
    from .models import flow_matching_loss
    from .stage3 import dmd_grad, dmd_loss
    opt = torch.optim.AdamW(student.parameters(), lr=5e-7)
    fake_opt = torch.optim.AdamW(critics.fake_parameters(), lr=5e-6)
    null = Cond(text=torch.zeros_like(cond.text))

    def step():
        with autocast("bf16", cfg.device):
            out = flow.x0_from_velocity(x, torch.ones_like(s), velocity(student, x, torch.ones_like(s), cond))
            x_t = flow.add_noise(out.detach(), torch.randn_like(out), s)
            with torch.no_grad():
                x0_real = flow.x0_from_velocity(x_t, s, critics.real_velocity(x_t, s, cond, null, 3.5, 0.25))
                x0_fake = flow.x0_from_velocity(x_t, s, critics.fake_velocity(x_t, s, cond))
            loss = dmd_loss(out, dmd_grad(out.detach(), x0_real, x0_fake))
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        with autocast("bf16", cfg.device), critics.fake_view() as fake:  # backward inside: recomputation needs the adapter on
            fake_loss = flow_matching_loss(fake, out.detach(), torch.randn_like(out), s, cond)
            fake_opt.zero_grad(set_to_none=True); fake_loss.backward()
        fake_opt.step()
    return step


def run_gpu_bench(cfg: GpuBenchConfig) -> dict:
    from .stage3 import Critics, student_sigmas
    setup_torch(0, cfg.device)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise FlgError("flg bench --gpu needs a CUDA device (device=cpu with preset=tiny runs it on the CPU)")
    backends = [check_attention(b) for b in cfg.attention]
    if not backends:
        raise FlgError("attention must name at least one backend, e.g. [native]")
    if not cfg.compile or any(not isinstance(c, bool) for c in cfg.compile):
        raise FlgError(f"compile must be a list of true/false, e.g. [false, true], got {cfg.compile!r}")
    model = build(cfg)
    x, s, cond, tokens = inputs(cfg, model)
    n = len(blocks(model))
    d = round(n * (1 - cfg.retention))  # timing only: which blocks go does not matter, how many does
    drop = list(range((n - d) // 2, (n - d) // 2 + d))
    keep = complement(model, drop)
    out = Path(cfg.out)
    save_config(cfg, out)
    rows = []

    def record(*new):  # each row on screen and on disk as it is measured: a run cut off keeps what it measured
        rows.extend(new)
        pd.DataFrame(rows).to_csv(out / "bench_gpu.csv", index=False)
        for r in new:
            print(f"{r['what']} [{r['grad_checkpointing']} ckpt, {r['attention']}, compile {r['compile']}]: "
                  + ("out of memory" if r["oom"] else f"{r['sec']:.3f} s, MFU {r['mfu']:.3f}, peak {r['peak_gib']:.1f} GiB"),
                  flush=True)
    base = dict(preset=cfg.preset, blocks_built=n, tokens=tokens, batch=cfg.batch_size)
    # FLOPs are counted eagerly (compiling changes no model FLOP); the compile itself happens in measure's warm-up
    for comp, att in [(c, a) for c in cfg.compile for a in backends]:
        set_attention(model, att)
        for ckpt in map(checkpoint_share, cfg.checkpointing):
            set_checkpointing(model, ckpt)
            tag = f"ckpt={ckpt} attention={att} compile={comp}"
            row = dict(base, grad_checkpointing=ckpt, attention=att, compile=comp)
            if "stage2" in cfg.what:
                model.train()
                make = lambda x_, s_, c_: stage2_step_fn(cfg, model, drop, x_, s_, c_)  # noqa: E731
                flops = count_flops(make, cfg, model)
                compile_blocks(model, comp)
                r = measure(make(x, s, cond), flops, cfg, f"stage2 {tag}")
                compile_blocks(model, False)
                record(dict(row, what="stage2 step", **r))
                torch.cuda.empty_cache() if cfg.device.startswith("cuda") else None
            if "stage3" in cfg.what:
                student = prune(model, keep).train()  # keeps the blocks' checkpointing marks and attention backend
                critics = Critics(model, drop, "lora", "pruned", cfg.lora_rank)
                make = lambda x_, s_, c_: stage3_step_fn(cfg, model, student, critics, x_, s_, c_)  # noqa: E731
                flops = count_flops(make, cfg, model, [student])
                compile_blocks(model, comp); compile_blocks(student, comp)
                r = measure(make(x, s, cond), flops, cfg, f"stage3 {tag}")
                compile_blocks(model, False)
                record(dict(row, what="stage3 student turn + fake update", **r))
                model.delete_adapters("fake")
                for p in model.parameters():
                    p.requires_grad_(True)
                del student, critics
                torch.cuda.empty_cache() if cfg.device.startswith("cuda") else None
    summary, by_attention = {}, {}
    if "inference" in cfg.what:  # last: the model goes to bf16 in place
        set_checkpointing(model, 0)
        teacher = model.to(torch.bfloat16).eval()
        sig, ss = flow.euler_sigmas(cfg.teacher_steps, 5.0), student_sigmas(cfg.student_steps, 5.0)

        def teacher_fn(x_, s_, c_):
            null = Cond(text=torch.zeros_like(c_.text))
            v_t = flow.guided(lambda z, t: velocity(teacher, z, t, c_), lambda z, t: velocity(teacher, z, t, null), cfg.teacher_cfg)
            return lambda: flow.euler_sample(v_t, x_.to(torch.bfloat16), sig)

        def student_fn(x_, s_, c_):
            return lambda: flow.fewstep_sample(lambda z, t: velocity(student, z, t, c_), x_.to(torch.bfloat16), ss)
        theoretical = (flow.nfe(cfg.teacher_steps, cfg.teacher_cfg) * n) / (cfg.student_steps * len(keep))
        for att in backends:
            set_attention(teacher, att)
            student = prune(teacher, keep)
            with torch.no_grad():
                rt = measure(teacher_fn(x, s, cond), count_flops(teacher_fn, cfg, teacher), cfg, f"teacher 50 x CFG attention={att}")
                rs = measure(student_fn(x, s, cond), count_flops(student_fn, cfg, teacher), cfg, f"student attention={att}")
            record(dict(base, what="teacher sampling", grad_checkpointing=0.0, attention=att, compile=False, **rt),
                   dict(base, what="student sampling", grad_checkpointing=0.0, attention=att, compile=False, **rs))
            by_attention[att] = dict(theoretical_speedup=theoretical, measured_speedup=rt["sec"] / rs["sec"],
                                     ratio=rt["sec"] / rs["sec"] / theoretical, kept_blocks=len(keep))
        summary = dict(by_attention[backends[0]], by_attention=by_attention)  # the first backend's at the top level
    if "eval" in cfg.what:
        del model
        summary["eval_throughput"] = [eval_throughput(cfg, out, kind) for kind in ("teacher", "student")]
        for r in summary["eval_throughput"]:
            print(f"eval throughput ({r['model']}): flg eval {r['flg_eval_videos_per_hour']:.1f} videos/h, plain "
                  f"pipeline {r['plain_videos_per_hour']:.1f} videos/h, ratio {r['ratio']:.2f}", flush=True)
    dev = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else "cpu"
    write_json(out / "metrics.json", dict(summary, device=dev, rows=rows))
    if not rows:
        return dict(summary, rows=rows)
    print(pd.DataFrame(rows)[["what", "grad_checkpointing", "attention", "compile", "sec", "tflops", "mfu", "peak_gib", "oom"]].to_string(index=False))
    for att, r in by_attention.items():
        print(f"speed-up ({att} attention): theoretical {r['theoretical_speedup']:.1f}x, measured "
              f"{r['measured_speedup']:.1f}x, ratio {r['ratio']:.2f}  [{dev}]")
    return dict(summary, rows=rows)


# ----------------------------------------------------------------------------- evaluation throughput (what: [eval])

def write_bench_pipeline(cfg: GpuBenchConfig, folder: Path) -> tuple[Path, Path]:
    """A Wan T2V pipeline of the preset's transformer (random weights), the Wan 2.1 VAE's architecture (random
    weights) and a one-layer text encoder (the same cost in both paths compared), plus a student folder of
    its kept blocks with the 4-step scheduler, as `flg stage3` exports one. Returns (pipeline, student)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel
    from . import synth
    from .cache import _word_tokenizer
    from .stage3 import export_student, student_sigmas
    pipe_dir, student_dir = folder / "pipeline", folder / "student"
    cfg_cpu = GpuBenchConfig(**{**vars(cfg), "device": "cpu"})
    transformer = build(cfg_cpu).to(torch.bfloat16)
    tokenizer, vocab = _word_tokenizer(set(synth.VOCAB), ["<pad>", "<unk>", "</s>"])
    d = transformer.config.text_dim
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=d, d_kv=max(1, d // 8), d_ff=2 * d,
                                               num_layers=1, num_heads=8, relative_attention_num_buckets=8))
    tiny = cfg.preset == "tiny"
    vae = AutoencoderKLWan(**(dict(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                   temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                   latents_std=[1.0] * 4) if tiny else {}))  # the defaults: Wan 2.1's VAE
    WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(), transformer=transformer,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)).save_pretrained(pipe_dir)
    n = len(blocks(transformer))
    dropped = round(n * (1 - cfg.retention))
    keep = complement(transformer, list(range((n - dropped) // 2, (n - dropped) // 2 + dropped)))
    meta = dict(family="wan", kind="student", prediction="velocity", shift=3.0, sampler="fewstep",
                steps=cfg.student_steps, sigmas=student_sigmas(cfg.student_steps, 3.0), cfg_scale=1.0, keep=keep,
                pipeline=str(pipe_dir.resolve()))
    export_student(prune(transformer, keep), None, student_dir, meta)
    return pipe_dir, student_dir


def eval_throughput(cfg: GpuBenchConfig, out: Path, kind: str) -> dict:
    """Videos per hour of `flg eval` (seeds of a prompt batched, the prompt encoded once) against the plain
    pipeline call, one video per call, on the same prompts, seeds and settings; sampling and decoding only
    (no scoring, no file writing), each after one warm-up call."""
    from . import pipelines, synth
    folder = out / "eval_bench"
    if not (folder / "student" / "flgcore.json").is_file():
        write_bench_pipeline(cfg, folder)
    model = folder / ("pipeline" if kind == "teacher" else "student")
    spec = pipelines.PipeSpec(steps=cfg.teacher_steps if kind == "teacher" else None,
                              guidance_scale=cfg.teacher_cfg if kind == "teacher" else None,
                              height=cfg.height, width=cfg.width, frames=cfg.frames, precision="bf16"
                              if cfg.device.startswith("cuda") else "fp32")
    loaded = pipelines.load(str(model), spec=spec, device=cfg.device)
    prompts = [synth.clip_spec(i).caption for i in range(cfg.eval_prompts)]
    seeds = list(range(cfg.eval_per_prompt))

    def timed(fn) -> float:
        fn(prompts[0], seeds[:1])  # warm-up
        _sync(cfg.device)
        t0 = time.perf_counter()
        for p in prompts:
            fn(p, seeds)
        _sync(cfg.device)
        return time.perf_counter() - t0

    def plain(prompt, seeds_):
        for sd in seeds_:
            if isinstance(loaded.pipe.scheduler, pipelines._SeededScheduler):
                loaded.pipe.scheduler.generators = None  # the stock behaviour: torch's global stream
            loaded.pipe(prompt=prompt, generator=torch.Generator().manual_seed(sd), output_type="np", **loaded.call)
    ours = timed(lambda p, sd: pipelines.generate(loaded, p, sd))
    stock = timed(plain)
    n = len(prompts) * len(seeds)
    return dict(model=kind, videos=n, blocks=loaded.info["blocks"], steps=loaded.info["steps"],
                flg_eval_videos_per_hour=3600 * n / ours, plain_videos_per_hour=3600 * n / stock, ratio=stock / ours,
                height=cfg.height, width=cfg.width, frames=cfg.frames)
