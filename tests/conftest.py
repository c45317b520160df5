import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(params=["wan-t2v", "wan-i2v", "hunyuan", "hunyuan-i2v"])
def tiny(request):
    from flgcore.models import tiny_model
    return tiny_model(request.param)
