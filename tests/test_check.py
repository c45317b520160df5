"""`flg check`: the committed real-model configs parse, and the validator names what is wrong."""
import json
import shutil
from pathlib import Path

import pytest
from diffusers import DDIMScheduler

from flgcore.check import check_stage
from flgcore.cli import main
from flgcore.data import write_probe_cache
from flgcore.models import tiny_model

REAL = sorted(Path(__file__).parent.parent.glob("configs/real/*/*.yaml"))


@pytest.mark.parametrize("path", REAL, ids=[f"{p.parent.name}/{p.stem}" for p in REAL])
def test_committed_real_configs_parse_and_only_miss_their_paths(path):
    cfg, problems = check_stage(path.stem, str(path), [], processes=16)
    assert problems and all(("not found" in p or "no " in p) for p in problems), problems  # only absent files here
    if path.stem in ("stage2", "stage3"):
        assert cfg.batch_size == 16 and cfg.zero and cfg.precision == "bf16"


def test_validator_accepts_a_good_setup_and_names_each_problem(tmp_path):
    model = tiny_model("wan-i2v")
    model.save_pretrained(tmp_path / "ckpt" / "transformer")
    write_probe_cache(model, tmp_path / "cache")
    (tmp_path / "sel.json").write_text(json.dumps(dict(kept=[0, 2, 3], dropped=[1])))
    base = [f"model={tmp_path / 'ckpt'}", f"data={tmp_path / 'cache'}", f"selection={tmp_path / 'sel.json'}",
            "batch_size=4", "zero=true"]
    assert check_stage("stage2", None, base, processes=2)[1] == []
    assert main(["check", "stage2", "--gpus", "2", *base]) == 0

    _, problems = check_stage("stage2", None, base, processes=3)
    assert problems == ["batch_size=4 (global) is not divisible by 3 processes"]
    _, problems = check_stage("stage2", None, [*base, "compile=true"], processes=2)
    assert problems == ["compile=true is not supported with zero=true (ZeRO-3 gathers each block's weights in hooks)"]
    _, problems = check_stage("stage2", None, [*base, "precision=fp16"], processes=2)
    assert problems == ["precision must be fp32 or bf16, got 'fp16'"]
    _, problems = check_stage("stage3", None, [*base[:2], "batch_size=4", "attention=cudnn"], processes=1)
    assert any(p.startswith("attention must be a diffusers attention backend, got 'cudnn'") for p in problems)
    (tmp_path / "sel.json").write_text(json.dumps(dict(kept=[0], dropped=[7])))
    assert "out of range" in check_stage("stage2", None, base, processes=2)[1][0]
    DDIMScheduler().save_pretrained(tmp_path / "ckpt" / "scheduler")  # not a flow-matching model's scheduler
    assert any("DDIMScheduler is not a flow-matching scheduler" in p
               for p in check_stage("stage2", None, base, processes=2)[1])
    shutil.rmtree(tmp_path / "ckpt" / "scheduler")

    t2v = tiny_model("wan-t2v")  # a cache made for another model: channels agree, conditioning does not
    write_probe_cache(t2v, tmp_path / "cache_t2v")
    _, problems = check_stage("stage1", None, [f"model={tmp_path / 'ckpt'}", f"data={tmp_path / 'cache_t2v'}"])
    assert any("image-conditioned but the cache lacks image_latents" in p for p in problems)
    assert main(["check", "stage1", f"model={tmp_path / 'ckpt'}", f"data={tmp_path / 'cache_t2v'}"]) == 2
    t2v.save_pretrained(tmp_path / "ti2v" / "transformer")  # Wan 2.2 TI2V's shape: a text or an image cache
    for cache in ("cache", "cache_t2v"):
        assert check_stage("stage1", None, [f"model={tmp_path / 'ti2v'}", f"data={tmp_path / cache}"])[1] == []


def test_validator_knows_hunyuanvideo_image_condition_types(tmp_path):
    model = tiny_model("hunyuan", in_channels=4, image_condition_type="token_replace")
    model.save_pretrained(tmp_path / "ckpt" / "transformer")
    write_probe_cache(model, tmp_path / "cache")
    assert check_stage("stage1", None, [f"model={tmp_path / 'ckpt'}", f"data={tmp_path / 'cache'}"])[1] == []
    write_probe_cache(tiny_model("hunyuan"), tmp_path / "cache_t2v")  # token_replace needs the image condition
    _, problems = check_stage("stage1", None, [f"model={tmp_path / 'ckpt'}", f"data={tmp_path / 'cache_t2v'}"])
    assert any("lacks image_latents" in p for p in problems), problems
    cfg = json.loads((tmp_path / "ckpt" / "transformer" / "config.json").read_text())
    (tmp_path / "ckpt" / "transformer" / "config.json").write_text(json.dumps({**cfg, "image_condition_type": "other"}))
    _, problems = check_stage("stage1", None, [f"model={tmp_path / 'ckpt'}", "data=synth"])
    assert any("'other'" in p and "not supported" in p for p in problems), problems
