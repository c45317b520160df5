"""Pretraining (resume), sampling (videos, determinism) and evaluation on a tiny teacher bundle."""
import json
import shutil

import numpy as np
import pytest
import torch

from flgcore import synth
from flgcore.cli import main
from flgcore.config import load_config
from flgcore.evaluate import EvalConfig, run_eval
from flgcore.models import tiny_model
from flgcore.config import FlgError
from flgcore.pretrain import PretrainConfig, run_pretrain
from flgcore.sampling import SampleSpec, load_bundle, sample_seeds

TINY_ARCH = ["arch.num_layers=2", "arch.num_attention_heads=2", "arch.attention_head_dim=12",
             "arch.ffn_dim=32", "arch.freq_dim=16"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    cfg = load_config(PretrainConfig, None, [f"out={out}", "steps=4", "batch_size=4", "ckpt_every=2",
                                             "log_every=1", "warmup=2", *TINY_ARCH])
    run_pretrain(cfg)
    return cfg


def test_pretrain_writes_a_model_directory(tiny_run):
    from pathlib import Path
    out = Path(tiny_run.out)
    for f in ["config.yaml", "log.jsonl", "metrics.json", "model/flgcore.json", "model/transformer/config.json",
              "model/text_encoder/vocab.json"]:
        assert (out / f).is_file(), f
    assert len((out / "log.jsonl").read_text().splitlines()) == 4
    assert json.loads((out / "model/flgcore.json").read_text())["shift"] == tiny_run.shift


def test_pretrain_resumes_to_identical_weights(tiny_run, tmp_path):
    from pathlib import Path
    src = Path(tiny_run.out)
    shutil.copytree(src, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000004")  # as if killed after step 2's checkpoint
    cfg = load_config(PretrainConfig, None, [f"out={tmp_path / 'run'}", "steps=4", "batch_size=4", "ckpt_every=2",
                                             "log_every=1", "warmup=2", *TINY_ARCH])
    run_pretrain(cfg)
    a = load_bundle(src / "model").model.state_dict()
    b = load_bundle(tmp_path / "run" / "model").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_warm_start_begins_at_its_weights_and_counts_their_steps(tiny_run, tmp_path):
    from pathlib import Path
    src = Path(tiny_run.out) / "model"
    cfg = load_config(PretrainConfig, None, [f"out={tmp_path / 'warm'}", "steps=2", "batch_size=4", "warmup=1",
                                             "lr=0", f"init_from={src}", *TINY_ARCH])  # lr 0: the weights stay
    run_pretrain(cfg)
    a = load_bundle(src).model.state_dict()
    b = load_bundle(tmp_path / "warm" / "model").model.state_dict()
    assert all(torch.allclose(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "warm" / "model/flgcore.json").read_text())["trained_steps"] == 4 + 2


@pytest.mark.slow
def test_a_compiled_pretrain_logs_the_eager_losses_and_exports_a_plain_model(tiny_run, tmp_path):
    from pathlib import Path
    cfg = load_config(PretrainConfig, None, [f"out={tmp_path / 'run'}", "steps=4", "batch_size=4", "ckpt_every=2",
                                             "log_every=1", "warmup=2", "compile=true", *TINY_ARCH])
    run_pretrain(cfg)
    eager = [json.loads(r)["loss"] for r in (Path(tiny_run.out) / "log.jsonl").read_text().splitlines()]
    compiled = [json.loads(r)["loss"] for r in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(compiled, eager, rtol=1e-3)
    a = load_bundle(Path(tiny_run.out) / "model").model.state_dict()
    b = load_bundle(tmp_path / "run" / "model").model.state_dict()  # same keys: no "_orig_mod." prefix
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-2, atol=1e-4) for k in a)


def test_clips_do_not_depend_on_batching(tiny_run):
    from pathlib import Path
    bundle = load_bundle(Path(tiny_run.out) / "model")
    spec = SampleSpec(steps=2).resolve(bundle.meta)
    seeds = synth.heldout_seeds(3)
    a, _ = sample_seeds(bundle, spec, seeds, batch_size=3, progress=False)
    b, _ = sample_seeds(bundle, spec, seeds, batch_size=1, progress=False)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert spec.nfe() == 2 * (1 if spec.cfg_scale == 1 else 2)
    with pytest.raises(FlgError, match="fewstep sampler needs sigmas"):
        SampleSpec(sampler="fewstep").resolve(bundle.meta)


def test_sample_and_eval_commands(tiny_run, tmp_path, capsys):
    from pathlib import Path
    model = str(Path(tiny_run.out) / "model")
    assert main(["sample", "--model", model, "--seed", "2000000001,5", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert len(files) == 8 and sum(f.endswith(".mp4") for f in files) == 2
    assert main(["sample", "--model", model, "--caption", "a purple cat", "--out", str(tmp_path / "x")]) == 2
    assert "unknown word 'purple'" in capsys.readouterr().err
    agg = run_eval(EvalConfig(model=model, out=str(tmp_path / "e"), n=4, steps=2, batch_size=2, videos=1))
    assert set(agg) >= {"average", "text_alignment", "frechet_distance", "nfe"}
    assert (tmp_path / "e" / "metrics.json").is_file() and (tmp_path / "e" / "clips.csv").is_file()
    rows = (tmp_path / "e" / "clips.csv").read_text().splitlines()
    assert len(rows) == 5
    # the saved clips evaluate to the same per-clip scores as a folder
    agg2 = run_eval(EvalConfig(clips=str(tmp_path / "s"), out=str(tmp_path / "e2"), videos=0))
    assert agg2["n"] == 2
    capsys.readouterr()
    # the same model against itself on the same seeds: every difference and its interval is zero
    assert main(["compare", str(tmp_path / "e"), str(tmp_path / "e"), "--boot", "50"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[1:] == [f"{agg['average']:.4f}"] * 2 + ["0.0"] * 4
    assert main(["compare", str(tmp_path / "e"), str(tmp_path / "e2")]) == 2
    assert "different seeds" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "e"), str(tmp_path / "nowhere")]) == 2
    assert "no clips.csv" in capsys.readouterr().err


def test_bad_model_directory_is_one_line(tmp_path, capsys):
    assert main(["eval", f"model={tmp_path}", f"out={tmp_path / 'e'}"]) == 2
    assert "not a flgcore model directory" in capsys.readouterr().err
    tiny_model("wan-t2v").save_pretrained(tmp_path / "ckpt" / "transformer")  # a real checkpoint: no text encoder
    for argv in (["sample", "--model", str(tmp_path / "ckpt"), "--seed", "1", "--out", str(tmp_path / "s")],
                 ["eval", f"model={tmp_path / 'ckpt'}", f"out={tmp_path / 'e'}"],
                 ["bench", f"teacher={tmp_path / 'ckpt'}", f"student={tmp_path / 'ckpt'}", f"out={tmp_path / 'b'}"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("flg: error:") and "has no SynthMotion text encoder" in err and len(err.splitlines()) == 1


def test_save_video_skips_only_the_mp4_without_imageio_ffmpeg(tmp_path, monkeypatch):
    import importlib.util

    from flgcore.sampling import save_video
    clip = torch.rand(3, synth.FRAMES, synth.SIZE, synth.SIZE) * 2 - 1
    assert [p.suffix for p in save_video(clip, tmp_path / "a.b")] == [".mp4", ".gif", ".png"]
    assert all((tmp_path / f"a.b.{e}").stat().st_size > 0 for e in ("mp4", "gif", "png"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "imageio_ffmpeg" else find_spec(name, *a))
    with pytest.warns(UserWarning, match="imageio-ffmpeg"):
        paths = save_video(clip, tmp_path / "c")
    assert [p.suffix for p in paths] == [".gif", ".png"] and all(p.stat().st_size > 0 for p in paths)
    assert not (tmp_path / "c.mp4").exists()
