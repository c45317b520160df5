"""Cached latents: Stages I and II train a plain diffusers checkpoint from a latent cache folder."""
import json

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from flgcore.data import LatentCache, write_probe_cache
from flgcore.importance import Stage1Config, run_stage1
from flgcore.models import load_transformer, tiny_model
from flgcore.config import FlgError
from flgcore.sampling import scheduler_shift
from flgcore.stage2 import Stage2Config, run_stage2


def _checkpoint_and_cache(kind, tmp_path, n=4):
    model = tiny_model(kind)
    model.save_pretrained(tmp_path / "ckpt" / "transformer")  # a pipeline-style folder: <dir>/transformer
    return model, tmp_path / "ckpt", write_probe_cache(model, tmp_path / "cache", n)


# The schedulers the real pipelines ship, with their shifts: Wan's UniPC names it `flow_shift`.
REAL_SCHEDULERS = {
    "wan-i2v": lambda: UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    "hunyuan-i2v": lambda: FlowMatchEulerDiscreteScheduler(shift=7.0),
}


@pytest.mark.parametrize("kind", ["wan-i2v", "hunyuan-i2v"])
def test_stages_1_and_2_run_on_a_diffusers_checkpoint_from_cached_latents(kind, tmp_path):
    model, ckpt, cache = _checkpoint_and_cache(kind, tmp_path)
    scheduler = REAL_SCHEDULERS[kind]()
    scheduler.save_pretrained(ckpt / "scheduler")
    n_blocks = sum(1 for _ in model.modules() if type(_).__name__.endswith("TransformerBlock"))
    m1 = run_stage1(Stage1Config(model=str(ckpt), data=str(cache), out=str(tmp_path / "s1"), n=4, batch_size=2,
                                 sigmas=[0.5], retention=0.7, compare_naive=False))
    assert m1["blocks"] == n_blocks
    run_stage2(Stage2Config(model=str(ckpt), data=str(cache), out=str(tmp_path / "s2"), selection=str(tmp_path / "s1" / "selection.json"),
                            steps=2, batch_size=2, warmup=1, cond_dropout=0.5))
    out = tmp_path / "s2" / "model"
    assert (out / "flgcore.json").is_file() and not (out / "text_encoder").exists()
    # the pipeline's shift is what Stage II trained at, and what Stage III will read from flgcore.json
    expected = scheduler.config.get("shift") or scheduler.config.flow_shift
    assert json.loads((out / "flgcore.json").read_text())["shift"] == expected
    trained = load_transformer(out / "transformer")
    assert type(trained) is type(model)
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), model.state_dict().values()))


def test_cache_condition_dropout_uses_the_null_prompt(tmp_path):
    import numpy as np
    _, _, cache = _checkpoint_and_cache("wan-i2v", tmp_path)
    c = LatentCache(cache)
    x0, cond = c.train_batch(np.random.default_rng(0), torch.Generator().manual_seed(0), 8, cond_dropout=1.0)
    assert x0.shape[0] == 8 and cond.image is not None
    assert cond.text.abs().sum() == 0  # every prompt replaced by the (zero) null embedding


def test_clear_errors_for_bad_caches(tmp_path):
    model, ckpt, cache = _checkpoint_and_cache("wan-i2v", tmp_path)
    (cache / "null.safetensors").unlink()
    with pytest.raises(FlgError, match="null.safetensors"):
        LatentCache(cache)
    with pytest.raises(FlgError, match="no such folder"):
        LatentCache(tmp_path / "nope")
    with pytest.raises(FlgError, match="data=synth needs"):
        run_stage2(Stage2Config(model=str(ckpt), out=str(tmp_path / "s2"), drop=[1], steps=1))


def test_the_sigma_shift_is_read_from_each_kind_of_pipeline_scheduler(tmp_path):
    def shift_of(scheduler):
        scheduler.save_pretrained(tmp_path / "scheduler")
        return scheduler_shift(tmp_path)
    assert scheduler_shift(tmp_path) == 1.0  # no scheduler/: a bare transformer folder
    assert shift_of(REAL_SCHEDULERS["wan-i2v"]()) == 3.0
    assert shift_of(REAL_SCHEDULERS["hunyuan-i2v"]()) == 7.0
    with pytest.raises(FlgError, match="resolution-dependent shift"):
        shift_of(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    with pytest.raises(FlgError, match="DDIMScheduler is not a flow-matching scheduler"):
        shift_of(DDIMScheduler())
    with pytest.raises(FlgError, match="not a flow-matching scheduler"):  # UniPC without flow sigmas: epsilon model
        shift_of(UniPCMultistepScheduler(flow_shift=3.0))
