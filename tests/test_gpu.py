"""On a CUDA device (skipped elsewhere; `pytest -m gpu`): the stages and the eval run there and agree with the CPU."""
import json

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_eval_on_the_gpu_matches_the_cpu(tiny_bundle_dir, tmp_path):
    from flgcore.evaluate import EvalConfig, run_eval
    got = {d: run_eval(EvalConfig(model=str(tiny_bundle_dir), n=8, steps=4, videos=0, device=d, out=str(tmp_path / d)))
           for d in ("cpu", "cuda")}
    # data and noise are drawn on the CPU; only TF32 matmuls differ
    assert got["cuda"]["average"] == pytest.approx(got["cpu"]["average"], abs=0.02)


def test_stage1_keeps_its_draws_and_optionally_the_replayed_prefix_in_cpu_memory(tiny_bundle_dir, tmp_path):
    from flgcore.importance import Stage1Config, run_stage1
    got = {store: run_stage1(Stage1Config(model=str(tiny_bundle_dir), out=str(tmp_path / str(store)), n=4, batch_size=2,
                                          sigmas=[0.5], device="cuda", store_on_cpu=store, compare_naive=True))
           for store in (False, True)}
    assert got[True]["scores_identical"] and got[False]["scores_identical"]
    assert got[True]["importance_first"] == got[False]["importance_first"]  # the same numbers, only the memory moves


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stage2_and_stage3_train_on_the_gpu(tiny_bundle_dir, tmp_path, precision):
    from flgcore.sampling import load_bundle
    from flgcore.stage2 import Stage2Config, run_stage2
    from flgcore.stage3 import Stage3Config, run_stage3
    run_stage2(Stage2Config(model=str(tiny_bundle_dir), out=str(tmp_path / "s2"), drop=[1, 2], steps=3, batch_size=2,
                            warmup=1, device="cuda", precision=precision))
    m2 = json.loads((tmp_path / "s2" / "metrics.json").read_text())
    assert m2["steps"] == 3 and m2["final_loss"] == m2["final_loss"]  # finite
    run_stage3(Stage3Config(model=str(tmp_path / "s2" / "model"), out=str(tmp_path / "s3"), steps=4, batch_size=2,
                            warmup=1, device="cuda", precision=precision))
    student = load_bundle(str(tmp_path / "s3" / "student")).model
    assert len(student.blocks) == 2  # the drop view's blocks only, loadable on the CPU
