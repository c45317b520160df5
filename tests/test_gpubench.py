"""`flg bench --gpu` on the CPU with the tiny preset: every row is measured and the speed-up is reported."""
import json

from flgcore.cli import main


def test_gpu_bench_runs_its_code_path_on_the_cpu(tmp_path):
    out = tmp_path / "gb"
    assert main(["bench", "--gpu", "preset=tiny", "device=cpu", "frames=5", "height=32", "width=32", "text_len=4",
                 "repeats=1", "warmup=0", "teacher_steps=3", "checkpointing=[0.5]", f"out={out}"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [r["what"] for r in m["rows"]] == ["stage2 step", "stage3 student turn + fake update", "teacher sampling",
                                              "student sampling"]
    assert all(r["sec"] > 0 and r["tflops"] > 0 for r in m["rows"])
    assert m["theoretical_speedup"] == (3 * 2 * 10) / (4 * 7) and m["kept_blocks"] == 7
    assert main(["bench", "--gpu", "preset=nope", "device=cpu", f"out={out}"]) == 2
    assert main(["bench", "--gpu", "preset=tiny", "device=cpu", "attention=[native, nope]", f"out={out}"]) == 2
    assert main(["bench", "--gpu", "preset=tiny", "device=cpu", "compile=[fast]", f"out={out}"]) == 2


def test_gpu_bench_measures_each_attention_backend(tmp_path):
    out = tmp_path / "gb"
    assert main(["bench", "--gpu", "preset=tiny", "device=cpu", "frames=5", "height=32", "width=32", "text_len=4",
                 "repeats=1", "warmup=0", "teacher_steps=3", "checkpointing=[0]", "what=[stage2, inference]",
                 "attention=[native, _native_math]", f"out={out}"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [(r["what"], r["attention"]) for r in m["rows"]] == [
        ("stage2 step", "native"), ("stage2 step", "_native_math"), ("teacher sampling", "native"),
        ("student sampling", "native"), ("teacher sampling", "_native_math"), ("student sampling", "_native_math")]
    assert set(m["by_attention"]) == {"native", "_native_math"} and m["ratio"] == m["by_attention"]["native"]["ratio"]


def test_gpu_bench_measures_compiled_blocks(tmp_path, monkeypatch):
    """compile=[false, true]: a row each, the compiled one timed with every block compiled, the same FLOPs."""
    import flgcore.gpubench
    from flgcore.surgery import compile_blocks
    compiled = []
    monkeypatch.setattr(flgcore.gpubench, "compile_blocks", lambda m, on=True: compiled.append(compile_blocks(m, on)))
    out = tmp_path / "gb"
    assert main(["bench", "--gpu", "preset=tiny", "device=cpu", "frames=5", "height=32", "width=32", "text_len=4",
                 "repeats=1", "warmup=1", "checkpointing=[0.5]", "what=[stage2]", "compile=[false, true]",
                 f"out={out}"]) == 0
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert [r["compile"] for r in rows] == [False, True] and rows[0]["tflops"] == rows[1]["tflops"]
    assert compiled == [0, 0, 10, 0]  # off, off / on (the 10 blocks), off again


def test_a_bench_cut_off_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    """Each row is on disk as soon as it is measured: a run stopped at a time limit still has them."""
    import pandas as pd
    import flgcore.gpubench
    real, calls = flgcore.gpubench.measure, []

    def measure_then_stop(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a time limit's signal looks like from inside
        return real(*a, **k)
    monkeypatch.setattr(flgcore.gpubench, "measure", measure_then_stop)
    out = tmp_path / "gb"
    assert main(["bench", "--gpu", "preset=tiny", "device=cpu", "frames=5", "height=32", "width=32", "text_len=4",
                 "repeats=1", "warmup=0", "checkpointing=[0, 1]", "what=[stage2]", f"out={out}"]) != 0
    rows = pd.read_csv(out / "bench_gpu.csv")
    assert list(rows["what"]) == ["stage2 step"] and list(rows["grad_checkpointing"]) == [0.0]
    assert (out / "config.yaml").exists() and not (out / "metrics.json").exists()


def test_a_setting_out_of_gpu_memory_is_a_row_not_a_crash():
    import torch
    from flgcore.gpubench import GpuBenchConfig, measure

    def too_big():
        raise torch.OutOfMemoryError("CUDA out of memory")
    r = measure(too_big, 1e12, GpuBenchConfig(device="cpu", repeats=1, warmup=0), "stage2")
    assert r["oom"] and r["sec"] != r["sec"]  # nan


def test_flops_at_full_size_come_exactly_from_three_small_counts():
    """The quadratic fit from 1-3 latent frames equals a direct count at 5 latent frames."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from flgcore.gpubench import GpuBenchConfig, build, count_flops, inputs
    from flgcore.models import velocity
    from flgcore.surgery import checkpoint_blocks, checkpointed
    cfg = GpuBenchConfig(preset="tiny", device="cpu", frames=17, height=32, width=48, text_len=4)
    model = build(cfg).eval()
    make = lambda x, s, c: (lambda: velocity(model, x, s, c))  # noqa: E731
    x, s, cond, _ = inputs(cfg, model)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        make(x, s, cond)()
    checkpoint_blocks(model, [1, 2, 7])  # counting switches checkpointing off, then puts back exactly these
    with torch.no_grad():
        assert abs(count_flops(make, cfg, model) / fc.get_total_flops() - 1) < 1e-9
    assert checkpointed(model) == [1, 2, 7]


def test_gpu_bench_eval_throughput_row_on_the_cpu(tmp_path):
    """The evaluation-throughput row's code path (tiny preset on the CPU): flg eval's sampling against the plain
    pipeline call on the same prompts, for the teacher and its student. Its numbers are measured on a GPU."""
    from flgcore.gpubench import GpuBenchConfig, run_gpu_bench
    r = run_gpu_bench(GpuBenchConfig(preset="tiny", device="cpu", what=["eval"], frames=5, height=32, width=32,
                                     teacher_steps=2, student_steps=2, eval_prompts=2, eval_per_prompt=2,
                                     out=str(tmp_path)))
    teacher, student = r["eval_throughput"]
    assert teacher["model"] == "teacher" and student["blocks"] < teacher["blocks"] and student["steps"] == 2
    assert all(x["flg_eval_videos_per_hour"] > 0 and x["plain_videos_per_hour"] > 0 for x in (teacher, student))
