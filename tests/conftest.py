import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("FLG_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))


@pytest.fixture(params=["wan-t2v", "wan-i2v", "hunyuan", "hunyuan-i2v"])
def tiny(request):
    from flgcore.models import tiny_model
    return tiny_model(request.param)


TINY_ARCH = ["arch.num_layers=4", "arch.num_attention_heads=2", "arch.attention_head_dim=12",
             "arch.ffn_dim=32", "arch.freq_dim=16"]


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory):
    """A tiny teacher model directory (4 Wan blocks, 2 training steps): flgcore's model layout, in seconds."""
    from flgcore.config import load_config
    from flgcore.pretrain import PretrainConfig, run_pretrain
    out = tmp_path_factory.mktemp("tiny_teacher")
    run_pretrain(load_config(PretrainConfig, None, [f"out={out}", "steps=2", "batch_size=2", "warmup=1", *TINY_ARCH]))
    return out / "model"


@pytest.fixture(scope="session")
def tiny_stage2_dir(tiny_bundle_dir, tmp_path_factory):
    """A Stage-II model of the tiny teacher (blocks 1, 2 as the drop set, 2 steps)."""
    from flgcore.stage2 import Stage2Config, run_stage2
    out = tmp_path_factory.mktemp("tiny_stage2")
    run_stage2(Stage2Config(model=str(tiny_bundle_dir), out=str(out), drop=[1, 2], steps=2, batch_size=2, warmup=1))
    return out / "model"
