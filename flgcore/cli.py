"""The `flg` command line: one subcommand per stage or tool, each a thin shell over a flgcore function.

Stage commands take `--config FILE` and `key=value` overrides of the stage's dataclass config.
A user error (bad path, bad value) prints one line, `flg: error: ...`, and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


STAGES: set[str] = set()
STAGE_OPTIONS = {"--config", "--export-to", "--gpus", "--help", "-h"}
STAGE_FLAGS = {"--gpu"}  # options without a value


def _as_overrides(args: list[str]) -> list[str]:
    """Rewrite `--key value` / `--key=value` into `key=value` (keeping a stage's own options), so that
    `flg eval --model synth-tiny --n 256` and `flg eval model=synth-tiny n=256` mean the same."""
    from .config import FlgError
    out, i = [], 0
    while i < len(args):
        a = args[i]
        name = a.split("=", 1)[0]
        if a in STAGE_FLAGS:
            out.append(a)
            i += 1
            continue
        if not a.startswith("--") or name in STAGE_OPTIONS:
            out.append(a)
            if name in STAGE_OPTIONS and "=" not in a and i + 1 < len(args):
                out.append(args[i + 1])
                i += 1
            i += 1
            continue
        key = name[2:].replace("-", "_")
        if "=" in a:
            out.append(f"{key}={a.split('=', 1)[1]}")
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append(f"{key}={args[i + 1]}")
            i += 2
        else:
            raise FlgError(f"option {a} needs a value")
    return out


def _ints(text: str, what: str = "block indices") -> list[int]:
    from .config import FlgError
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise FlgError(f"expected comma-separated {what}, got {text!r}") from None


def _config(cls, a):
    """A stage's config from --config and the overrides, every value and input path checked before the stage
    writes anything (`load_config` leaves the paths to the stage, for `flg check`)."""
    from .config import check_values, load_config
    cfg = load_config(cls, a.config, a.overrides)
    check_values(cfg)
    return cfg


def cmd_blocks(a):
    from .models import load_model
    from .surgery import format_block_table
    print(format_block_table(load_model(a.model)))


def cmd_prune(a):
    import torch
    from .models import load_model, load_transformer
    from .config import FlgError, check_values
    from .surgery import blocks, complement, prune, retention_of, skipping
    check_values(dict(out=a.out))
    model = load_model(a.model)
    if (a.keep is None) == (a.drop is None):
        raise FlgError("give exactly one of --keep or --drop")
    keep = _ints(a.keep) if a.keep is not None else complement(model, _ints(a.drop))
    small = prune(model, keep)
    out = Path(a.out)
    small.save_pretrained(out)
    reloaded = load_transformer(out)
    # Check the round trip on one random input: skip view == pruned == reloaded.
    from .models import probe_inputs, velocity
    x, s, cond = probe_inputs(model)
    with torch.no_grad(), skipping(model, complement(model, keep)):
        v_skip = velocity(model, x, s, cond)
    with torch.no_grad():
        err = max((velocity(m, x, s, cond) - v_skip).abs().max().item() for m in (small, reloaded))
    print(f"kept {len(keep)}/{len(blocks(model))} blocks {keep} = {retention_of(model, keep):.1%} of block "
          f"parameters; saved to {out}; reloaded: max |skip view - pruned| = {err:.2e}")


def cmd_pretrain(a):
    from .pretrain import PretrainConfig, export_checkpoint, run_pretrain
    from .config import check_values
    cfg = _config(PretrainConfig, a)
    check_values(dict(out=a.export_to))  # the export's folder, by the rule of a run's `out`
    print(export_checkpoint(cfg, a.export_to) if a.export_to else run_pretrain(cfg))


def cmd_sample(a):
    import numpy as np
    import torch
    from . import synth
    from .config import check_values
    from .sampling import SampleSpec, load_bundle, load_image, require_encoder, sample_batch, save_video
    from .surgery import check_indices
    from . import pipelines
    seeds, drop = _ints(a.seed, "seeds"), _ints(a.drop) if a.drop else []
    check_values(dict(seed=seeds, steps=a.steps, cfg=a.cfg, drop=drop, out=a.out))
    if pipelines.is_real(a.model):
        return _sample_real(a, seeds)
    first_image = load_image(a.image) if a.image else None
    bundle = require_encoder(load_bundle(a.model), a.model)
    spec = SampleSpec(a.sampler, a.steps, a.cfg, None, None, drop).resolve(bundle.meta)
    check_indices(bundle.model, drop, "dropped block index")
    out = Path(a.out)
    for seed in seeds:
        clip_spec = synth.clip_spec(seed)
        first = first_image if a.image else torch.from_numpy(synth.render(clip_spec, frames=1)[:, 0])
        caption = a.caption if a.caption is not None else clip_spec.caption
        bundle.encoder.encode([caption])  # refuse unknown words before sampling
        clip = sample_batch(bundle, spec, first[None], [caption], [seed])[0]
        stem = out / f"{seed}_{caption.replace(' ', '_') or 'null'}"
        paths = save_video(clip, stem)
        np.savez(out / f"{stem.name}.npz", clip=clip.numpy(), seed=seed, caption=caption)
        print(f"{caption!r} (seed {seed}, {spec.sampler}, nfe {spec.nfe()}): " + ", ".join(str(p) for p in paths))


def _sample_real(a, seeds: list[int]) -> None:
    """`flg sample` of a real checkpoint: one prompt (and image), one video per seed, through its stock pipeline."""
    from . import pipelines
    from .config import FlgError
    from .suites import SuiteItem, load_image
    if a.caption is None or a.drop or a.sampler:
        raise FlgError("a real checkpoint takes --prompt (and --image for image-conditioned models), --view drop for a "
                       "Stage-II model's drop view, --scheduler, not --drop/--sampler")
    spec = pipelines.PipeSpec(a.scheduler, a.steps, a.cfg, a.height, a.width, a.frames, a.precision)
    loaded = pipelines.load(a.model, a.base, a.view, spec, a.device)
    image = None
    if loaded.image_conditioned:
        if not a.image:
            raise FlgError(f"{a.model} is image-conditioned: give --image")
        if not Path(a.image).is_file():
            raise FlgError(f"--image {a.image}: no such file")
        # cropped and resized as `flg eval` prepares a suite's images
        image = load_image(SuiteItem(0, a.caption, Path(a.image).resolve()), *pipelines.video_size(loaded))
    out = Path(a.out)
    videos = pipelines.generate(loaded, a.caption, seeds, image)
    for seed, v in zip(seeds, videos):
        path = pipelines.write_video(v, out / f"{a.caption.replace('/', '_')}-{seed}.mp4", pipelines.FPS[loaded.family])
        print(f"{a.caption!r} (seed {seed}, {loaded.kind}, {loaded.info['steps']} steps): {path}")
    print(pipelines.contact_sheet(list(videos), out / "contact_sheet.png"))


def cmd_stage1(a):
    from .importance import Stage1Config, run_stage1
    run_stage1(_config(Stage1Config, a))


def cmd_stage2(a):
    from .stage2 import Stage2Config, run_stage2
    print(run_stage2(_config(Stage2Config, a)))


def cmd_stage3(a):
    from .stage3 import Stage3Config, run_stage3
    print(run_stage3(_config(Stage3Config, a)))


def cmd_bench(a):
    if a.gpu:
        from .gpubench import GpuBenchConfig, run_gpu_bench
        run_gpu_bench(_config(GpuBenchConfig, a))
        return
    from .bench import BenchConfig, run_bench
    run_bench(_config(BenchConfig, a))


def cmd_notebooks(a):
    """`run` (exit status 3 when runs are pending on Slurm, 2 when a notebook failed) or `plan` (nothing runs)."""
    import yaml
    from .config import FlgError, check_values
    from .launch import PENDING_EXIT
    from .notebooks import plan_notebooks, run_label, run_notebooks
    params = {}
    for kv in a.param or []:
        if "=" not in kv:
            raise FlgError(f"-p expects key=value, got {kv!r}")
        k, v = kv.split("=", 1)
        try:
            params[k] = yaml.safe_load(v)
        except yaml.YAMLError:
            raise FlgError(f"-p {kv}: the value is not valid YAML") from None
    check_values(dict(params, out=a.out))  # named like the config fields, so checked by the same rules
    if a.action == "plan":
        status, table = plan_notebooks(a.profile, a.only, params, a.out, a.bench, a.force)
    else:
        status = run_notebooks(a.profile, a.only, params, a.out, a.force)
    width = max(map(len, status))
    for name, st in status.items():
        print(f"{name:<{width}}  {st}")
    if a.action == "plan":
        import pandas as pd
        with pd.option_context("display.max_colwidth", 80, "display.width", 200, "display.float_format", "{:.3g}".format):
            print(f"runs under {a.out}/{run_label(a.profile, params.get('model'))}/:")
            print(table.to_string(index=False) if len(table) else "no runs")
        todo = table[table.status != "finished"]
        known = todo.gpu_hours.dropna()
        print(f"{len(todo)} runs to start ({known.sum():.3g} GPU-hours for the {len(known)} estimated), "
              f"{len(table) - len(todo)} finished; runs after a pending one are not listed (they need its results)")
        return
    failed = [n for n, st in status.items() if st.startswith("FAILED")]
    if failed:
        raise FlgError(f"{len(failed)} notebook(s) failed: {', '.join(failed)} (executed copies under "
                       f"{a.out}/{run_label(a.profile, params.get('model'))}/)")
    pending = [n for n, st in status.items() if st.startswith("pending")]
    if pending:
        print(f"flg: {', '.join(pending)}: runs pending on Slurm; run the same command again when they finish",
              file=sys.stderr)
        sys.exit(PENDING_EXIT)


def cmd_cache(a):
    from .cache import CacheConfig, run_cache
    run_cache(_config(CacheConfig, a))


def cmd_check(a):
    from .check import check_stage
    from .config import to_dict
    from .config import FlgError
    cfg, problems = check_stage(a.stage, a.config, a.overrides, a.gpus)
    for p in problems:
        print(f"  - {p}")
    if problems:
        raise FlgError(f"{a.stage} config: {len(problems)} problem(s), fix them before launching")
    extra = f", {cfg.batch_size // a.gpus} per process x {a.gpus}" if hasattr(cfg, "batch_size") and a.stage != "stage1" else ""
    print(f"{a.stage} config OK (out={to_dict(cfg)['out']}{extra})")


def cmd_eval(a):
    from .evaluate import EvalConfig, run_eval
    run_eval(_config(EvalConfig, a))


def cmd_compare(a):
    from .config import check_values
    from .evaluate import paired_difference, read_clips
    check_values(dict(boot=a.boot))
    table = paired_difference(read_clips(a.a), read_clips(a.b), a.boot)
    print(f"a = {a.a}\nb = {a.b}")
    print(table.round(4).to_string())


class _Parser(argparse.ArgumentParser):
    """A usage error is one line too, with argparse's exit status (2), instead of the usage text."""

    def error(self, message):
        from .config import FlgError
        raise FlgError(f"{message} (see {self.prog} -h)")


def main(argv: list[str] | None = None) -> int:
    global _tore_down_group
    from .config import FlgError
    p = _Parser(prog="flg", description="FastLightGen: fast, light video DiTs (flgcore)")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("blocks", help="print a model's block table")
    s.add_argument("--model", default="synth-tiny", help="synth-tiny, tiny:<kind>, or a diffusers directory")
    s.set_defaults(fn=cmd_blocks)

    s = sub.add_parser("prune", help="physically remove blocks and save a smaller diffusers model")
    s.add_argument("--model", default="synth-tiny")
    s.add_argument("--keep", help="comma-separated global block indices to keep")
    s.add_argument("--drop", help="comma-separated global block indices to drop")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_prune)

    s = sub.add_parser("sample", help="sample clips (mp4, gif, png strip, npz) from a model")
    s.add_argument("--model", default="synth-tiny")
    s.add_argument("--caption", "--prompt", dest="caption",
                   help="default: the seed's SynthMotion caption, e.g. 'a red square moves left quickly' (a real "
                        "checkpoint: required)")
    s.add_argument("--seed", default="2000000000", help="comma-separated seeds (noise, and the first frame unless --image)")
    s.add_argument("--image", help="first frame (PNG/JPEG, resized to 32x32)")
    s.add_argument("--sampler", choices=["euler", "fewstep"], help="default: the model's saved sampler")
    s.add_argument("--steps", type=int)
    s.add_argument("--cfg", type=float)
    s.add_argument("--drop", help="comma-separated blocks to skip (a Stage-II model's drop view)")
    s.add_argument("--view", choices=["full", "drop"], default="full", help="a Stage-II model of a real checkpoint: "
                   "which view to sample")
    s.add_argument("--base", help="a real checkpoint's stage output: the pipeline folder it was made from, if moved")
    s.add_argument("--scheduler", choices=["euler", "default"], default="euler",
                   help="a real teacher: 50 Euler steps (the paper's) or the pipeline's own sampler")
    s.add_argument("--height", type=int)
    s.add_argument("--width", type=int)
    s.add_argument("--frames", type=int)
    s.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    s.add_argument("--device", default="cpu")
    s.add_argument("--out", default="runs/samples")
    s.set_defaults(fn=cmd_sample)

    def stage(name, fn, hlp):
        STAGES.add(name)
        s = sub.add_parser(name, help=hlp, description=f"{hlp}. Config keys are given as key=value or --key value.")
        s.add_argument("--config", help="YAML config file")
        s.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys for nested sections)")
        s.set_defaults(fn=fn)
        return s

    stage("cache", cmd_cache, "Stage 0: encode mp4 + captions with a local diffusers pipeline into sharded latents (resumable)")
    s = stage("pretrain", cmd_pretrain, "train the tiny teacher on SynthMotion (resumes from its last checkpoint)")
    s.add_argument("--export-to", help="only export the latest checkpoint's EMA weights to this model directory")
    stage("stage1", cmd_stage1, "Stage I: block importance (Eq. 4 / Eq. 3) and a keep set for a retention")
    stage("stage2", cmd_stage2, "Stage II: dynamic probabilistic pruning with self-distillation (resumable)")
    stage("stage3", cmd_stage3, "Stage III: distribution matching with well-guided teacher guidance -> few-step pruned student")
    s = stage("bench", cmd_bench, "time the teacher (Euler + CFG) against the student (few steps) on the same clips")
    s.add_argument("--gpu", action="store_true", help="Stages II-III step time, memory, MFU and inference on a "
                   "random-init Wan at a real size (GpuBenchConfig: preset=wan2.1-1.3b ...)")
    stage("eval", cmd_eval, "SynthBench scores of a model on held-out seeds (or of a folder of clips)")

    s = sub.add_parser("compare", help="two `flg eval` runs on the same seeds: per-dimension difference a - b "
                       "with its 95%% paired-bootstrap interval")
    s.add_argument("a", help="an eval run folder (e.g. the student's)")
    s.add_argument("b", help="another, on the same seeds (e.g. the teacher's)")
    s.add_argument("--boot", type=int, default=10_000, help="bootstrap resamples")
    s.set_defaults(fn=cmd_compare)

    s = sub.add_parser("check", help="validate a stage config before launching it (paths, blocks, cache, batch x processes)")
    s.add_argument("stage", choices=["cache", "stage1", "stage2", "stage3"])
    s.add_argument("--config", help="YAML config file")
    s.add_argument("--gpus", type=int, default=1, help="total processes the launch will use (nodes x GPUs per node)")
    s.add_argument("overrides", nargs="*", help="key=value overrides")
    s.set_defaults(fn=cmd_check)

    s = sub.add_parser("notebooks", help="execute the analysis notebooks with papermill")
    nsub = s.add_subparsers(dest="action", required=True)
    for action, hlp in (("run", "run the notebooks in dependency order into runs/notebooks/<profile>/ (exit status 3: "
                                "runs pending on Slurm, run it again later)"),
                        ("plan", "list the runs `run` would start, the finished ones, and GPU-hours per run; starts "
                                 "nothing")):
        r = nsub.add_parser(action, help=hlp)
        r.add_argument("--profile", default="quick", choices=["quick", "full"])
        r.add_argument("--only", action="append", help="a notebook name, e.g. 01_block_importance (repeatable)")
        r.add_argument("-p", "--param", action="append", help="key=value parameter for every notebook that has it "
                       "(launcher=<Slurm launcher YAML>: every run a Slurm job)")
        r.add_argument("--out", default="runs/notebooks")
        r.add_argument("--force", action="store_true", help="re-execute notebooks that already finished")
        if action == "plan":
            r.add_argument("--bench", help="flg bench --gpu's bench_gpu.csv: step times for runs not measured yet")
        r.set_defaults(fn=cmd_notebooks)

    argv = list(sys.argv[1:] if argv is None else argv)
    ok = False
    try:
        if argv and argv[0] in STAGES:
            argv = argv[:1] + _as_overrides(argv[1:])
        elif argv[:1] == ["check"] and len(argv) > 1:  # options first: argparse cannot resume positionals after them
            rest = _as_overrides(argv[2:])
            opts = [a for i, a in enumerate(rest) if a in STAGE_OPTIONS or (i and rest[i - 1] in STAGE_OPTIONS)]
            argv = ["check", *opts, argv[1], *[a for a in rest if a not in opts]]
        a = p.parse_args(argv)
        a.fn(a)
        ok = True
    except FlgError as e:
        print(f"flg: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        # a path given on the command line that a check above did not reach: still bad input, in one line
        print(f"flg: error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flg: interrupted", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # a ZeRO run's process group: torn down before exit
            from .zero import shutdown
            _tore_down_group = shutdown(ok)
    return 0


_tore_down_group = False


def entry() -> None:
    """The process entry point (`flg`, `python -m flgcore.cli`, the launchers' `-m flgcore.cli`). A ZeRO rank that
    returned has written and closed its files and torn its process group down: it leaves with os._exit, skipping the
    interpreter's teardown, in which gloo's worker threads have aborted a finished rank (zero.shutdown)."""
    rc = main()
    if _tore_down_group:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
