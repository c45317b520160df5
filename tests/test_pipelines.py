"""Real checkpoints end to end, on tiny random pipelines of the real diffusers classes: Stages 0-III, then the
teacher, a Stage-II drop view and a Stage-III student sampled through the stock pipeline and scored."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from flgcore import pipelines, synth
from tiny_pipelines import write_tiny_pipeline
from flgcore.cli import main
from flgcore.vbench import read_video as _read
from test_vbench import fake_vbench  # noqa: F401 - the fixture: a stand-in VBench environment

FAMILIES = {  # write_tiny_pipeline's arguments, and the frames asked for (HunyuanVideo-I2V's latent_concat
    # pipeline drops the first 4 decoded frames: 9 asked give 5)
    "wan2.1-t2v": (dict(image_conditioned=False), 9),
    "wan2.1-i2v": (dict(image_conditioned=True, clip=True), 9),
    "wan2.2-ti2v": (dict(ti2v=True), 9),
    "hunyuan-t2v": (dict(family="hunyuan", image_conditioned=False), 9),
    "hunyuan-i2v": (dict(family="hunyuan", image_conditioned=True), 9),
    "hunyuan-i2v-token-replace": (dict(family="hunyuan", image_conditioned=True, token_replace=True), 9),
}
SIZE = ["height=32", "width=32", "frames=9"]


def _videos(root, n=4):
    """SynthMotion clips as mp4 files, a manifest for `flg cache`, and a prompt suite with first-frame images."""
    import imageio.v2 as imageio
    from PIL import Image
    rows, suite = [], []
    for i in range(n):
        spec = synth.clip_spec(20 + i)
        frames = ((synth.render(spec, frames=9).transpose(1, 2, 3, 0) + 1) * 127.5).round().astype(np.uint8)
        imageio.mimwrite(root / f"v{i}.mp4", list(frames), fps=8, macro_block_size=1)
        Image.fromarray(frames[0]).save(root / f"f{i}.png")
        rows.append(f"v{i}.mp4,{spec.caption}\n")
        suite.append((spec.caption, f"f{i}.png"))
    (root / "manifest.csv").write_text("video,caption\n" + "".join(rows))
    return suite


def _suite(root, suite, images: bool):
    df = pd.DataFrame(suite[:2], columns=["prompt", "image"])
    path = root / ("suite_i2v.csv" if images else "suite_t2v.csv")
    (df if images else df[["prompt"]]).to_csv(path, index=False)
    return path


def _flg(*args):
    assert main([str(a) for a in args]) == 0, args


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cache_stages_eval_and_compare_end_to_end(family, tmp_path):
    kw, frames = FAMILIES[family]
    pipe = write_tiny_pipeline(tmp_path / "pipe", **kw)
    suite = _suite(tmp_path, _videos(tmp_path), pipelines.image_conditioned(pipe))
    cache, s1, s2, s3 = (tmp_path / d for d in ("cache", "s1", "s2", "s3"))
    _flg("cache", f"pipeline={pipe}", f"manifest={tmp_path / 'manifest.csv'}", f"out={cache}", f"frames={frames}",
         "height=32", "width=32", "shard_size=2", "max_sequence_length=8")
    _flg("stage1", f"model={pipe}", f"data={cache}", "n=2", "batch_size=2", "sigmas=[0.5]", "retention=0.7",
         "compare_naive=false", f"out={s1}")
    _flg("stage2", f"model={pipe}", f"data={cache}", f"selection={s1 / 'selection.json'}", "steps=2", "batch_size=2",
         "warmup=1", f"out={s2}")
    _flg("stage3", f"model={s2 / 'model'}", f"data={cache}", "steps=2", "batch_size=2", "fake_updates=1",
         "lora_rank=2", "student_steps=2", f"out={s3}")
    assert json.loads((s2 / "model" / "flgcore.json").read_text())["pipeline"] == str(pipe.resolve())
    common = [f"suite={suite}", "n_per_prompt=2", *SIZE[:2], f"frames={frames}", "videos=2"]
    runs = {"teacher": (pipe, ["steps=2"]), "drop": (s2 / "model", ["view=drop", "steps=2"]),
            "student": (s3 / "student", [])}
    for name, (model, extra) in runs.items():
        _flg("eval", f"model={model}", *common, *extra, f"out={tmp_path / name}")
    shape = None
    for name in runs:
        out = tmp_path / name
        m, clips = json.loads((out / "metrics.json").read_text()), pd.read_csv(out / "clips.csv")
        assert len(clips) == 4 and sorted(p.name for p in (out / "videos").glob("*.mp4")) == sorted(clips.video)
        info = json.loads((out / "vbench_full_info.json").read_text())
        assert [len(e["video_list"]) for e in info] == [2, 2]  # VBench's layout: <prompt>-<i>.mp4 per prompt
        assert (out / "contact_sheet.png").is_file() and "temporal_flickering" in m["definitions"]
        video = read_video(out / "videos" / clips.video[0])
        assert shape is None or video.shape == shape
        shape = video.shape
    assert json.loads((tmp_path / "student" / "metrics.json").read_text())["steps"] == 2
    assert json.loads((tmp_path / "drop" / "metrics.json").read_text())["blocks"] < \
        json.loads((tmp_path / "teacher" / "metrics.json").read_text())["blocks"]
    _flg("compare", tmp_path / "student", tmp_path / "teacher", "--boot", 200)


def _stock(pipe_dir, **kw):
    from diffusers import WanImageToVideoPipeline  # not DiffusionPipeline: it would ignore transformer= and scheduler=
    pipe = WanImageToVideoPipeline.from_pretrained(pipe_dir, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def wan_student(tmp_path_factory):
    """A Wan 2.1 I2V pipeline and a (2-iteration) Stage-III student of it, from a tiny latent cache."""
    root = tmp_path_factory.mktemp("student")
    pipe = write_tiny_pipeline(root / "pipe", image_conditioned=True, clip=True)
    _videos(root)
    _flg("cache", f"pipeline={pipe}", f"manifest={root / 'manifest.csv'}", f"out={root / 'cache'}", "frames=9",
         "height=32", "width=32", "max_sequence_length=8")
    _flg("stage2", f"model={pipe}", f"data={root / 'cache'}", "drop=[1]", "steps=1", "batch_size=2", "warmup=1",
         f"out={root / 's2'}")
    _flg("stage3", f"model={root / 's2' / 'model'}", f"data={root / 'cache'}", "steps=1", "batch_size=2",
         "fake_updates=1", "lora_rank=2", "student_steps=3", f"out={root / 's3'}")
    return pipe, root / "s3" / "student", root / "f0.png"


def test_a_students_video_is_the_stock_pipelines_with_that_student(wan_student):
    """flg's sampling = the stock pipeline given the student's transformer= and scheduler=, its steps, no CFG,
    with the same initial noise (the seed's generator) and re-noising draws (seed + RENOISE_OFFSET)."""
    from diffusers import FlowMatchLCMScheduler
    from PIL import Image
    from flgcore.models import load_transformer
    pipe_dir, student, image_path = wan_student
    image = Image.open(image_path).convert("RGB")
    loaded = pipelines.load(str(student), spec=pipelines.PipeSpec(height=32, width=32, frames=9))
    ours = pipelines.generate(loaded, "a red square moves left", [5], image)[0]
    stock = _stock(pipe_dir, transformer=load_transformer(student / "transformer"),
                   scheduler=FlowMatchLCMScheduler.from_pretrained(student / "scheduler"))
    torch.manual_seed(5 + pipelines.RENOISE_OFFSET)  # the stock pipeline re-noises from torch's global stream
    ref = stock(image=image, prompt="a red square moves left", height=32, width=32, num_frames=9,
                num_inference_steps=3, guidance_scale=1.0, generator=torch.Generator().manual_seed(5),
                output_type="np").frames[0]
    np.testing.assert_array_equal(ours, (np.asarray(ref) * 255).round().clip(0, 255).astype(np.uint8))
    assert ours.shape == (9, 32, 32, 3)  # the frame count and size the pipeline makes


@pytest.mark.parametrize("family", ["wan2.1-t2v", "wan2.2-ti2v", "hunyuan-t2v", "hunyuan-i2v"])
def test_batching_does_not_change_a_video(family, tmp_path):
    from PIL import Image
    kw, frames = FAMILIES[family]
    loaded = pipelines.load(str(write_tiny_pipeline(tmp_path / "p", **kw)),
                            spec=pipelines.PipeSpec(steps=2, height=32, width=32, frames=frames))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    image = image if loaded.image_conditioned else None
    together = pipelines.generate(loaded, "a blue circle moves up", [3, 4, 5], image)
    alone = np.stack([pipelines.generate(loaded, "a blue circle moves up", [s], image)[0] for s in (5, 3, 4)])
    # one uint8 level at most: a batched matmul may round its last float bit differently
    assert np.abs(together.astype(int) - alone[[1, 2, 0]]).max() <= 1
    assert not np.array_equal(together[0], together[1])  # and the seeds do differ
    if image is None:  # text-to-video: several prompts in one batch
        mixed = pipelines.generate(loaded, ["a red square moves left", "a blue circle moves up"], [7, 3], None)
        assert np.abs(mixed[1].astype(int) - alone[1]).max() <= 1
        assert np.abs(mixed[0].astype(int) - pipelines.generate(loaded, "a red square moves left", [7])[0]).max() <= 1


def test_a_moved_pipeline_needs_base_and_a_teacher_refuses_view_drop(wan_student, tmp_path):
    import shutil
    from flgcore.config import FlgError
    _, student, _ = wan_student
    moved = tmp_path / "student"
    shutil.copytree(student, moved)
    meta = json.loads((moved / "flgcore.json").read_text())
    (moved / "flgcore.json").write_text(json.dumps(dict(meta, pipeline=str(tmp_path / "gone"))))
    with pytest.raises(FlgError, match="pass base="):
        pipelines.load(str(moved))
    assert pipelines.load(str(moved), base=meta["pipeline"]).kind == "student"
    with pytest.raises(FlgError, match="no saved drop set"):
        pipelines.load(meta["pipeline"], view="drop")


def test_eval_reads_official_vbench_from_its_own_environment(wan_student, fake_vbench, tmp_path):  # noqa: F811
    """The bridge inside `flg eval` (the fake environment writes VBench's results format; see test_vbench.py):
    VBench-I2V gets each prompt's image, and its per-video values join clips.csv under vbench_<dimension>."""
    _, student, image = wan_student
    (tmp_path / "suite.csv").write_text(f"prompt,image\na red square moves left,{image}\n")
    _flg("eval", f"model={student}", f"suite={tmp_path / 'suite.csv'}", "n_per_prompt=2", *SIZE, f"out={tmp_path / 'e'}",
         f"vbench_python={fake_vbench[1]}", "vbench_dimensions=[temporal_flickering, dynamic_degree]")
    m, clips = json.loads((tmp_path / "e" / "metrics.json").read_text()), pd.read_csv(tmp_path / "e" / "clips.csv")
    assert set(m["vbench"]) == {"temporal_flickering", "dynamic_degree"}
    assert clips.vbench_temporal_flickering.notna().all() and (tmp_path / "e" / "images").is_dir()


def test_flg_sample_of_a_real_student_writes_the_evals_video(wan_student, tmp_path):
    """`flg sample` and `flg eval` make the same video for the same (model, prompt, image, seed)."""
    _, student, image = wan_student
    _flg("sample", "--model", student, "--prompt", "a red square moves left", "--image", image, "--seed", "3",
         "--height", 32, "--width", 32, "--frames", 9, "--out", tmp_path / "s")
    (tmp_path / "suite.csv").write_text(f"prompt,image\na red square moves left,{image}\n")
    _flg("eval", f"model={student}", f"suite={tmp_path / 'suite.csv'}", "seed_offset=3", *SIZE, f"out={tmp_path / 'e'}")
    a = read_video(tmp_path / "s" / "a red square moves left-3.mp4")
    b = read_video(tmp_path / "e" / "videos" / "a red square moves left-0.mp4")
    np.testing.assert_array_equal(a, b)
    assert (tmp_path / "s" / "contact_sheet.png").is_file()


def test_drop_prunes_given_blocks_of_a_pipelines_teacher(tmp_path):
    """`drop=[...]` on a pipeline: the untrained skip view (Stage II's starting point), sampled as the teacher."""
    pipe = write_tiny_pipeline(tmp_path / "p", image_conditioned=False)
    spec = dict(steps=2, height=32, width=32, frames=5)
    full, skip = (pipelines.load(str(pipe), spec=pipelines.PipeSpec(**spec, drop=d)) for d in ([], [1, 2]))
    assert (full.info["blocks"], skip.info["blocks"], skip.kind) == (4, 2, "skip")
    assert not np.array_equal(pipelines.generate(full, "a red square moves left", [0]),
                              pipelines.generate(skip, "a red square moves left", [0]))


def test_a_real_checkpoints_table_says_what_scored_it():
    from flgcore import report
    own = dict(temporal_flickering=0.9, dynamic_degree_farneback_proxy=0.5, motion_smoothness_proxy=0.7,
               first_frame_psnr=30.0, first_frame_ssim=0.8, definitions={}, steps=4, guidance_scale=1.0)
    vb = dict(own, vbench=dict(dynamic_degree=0.6, aesthetic_quality=0.5, imaging_quality=0.7, fig1_score=0.6))
    t = report.scores_table({"weight-free": own, "with VBench": vb})
    assert t.loc["weight-free", "average"] == pytest.approx((0.9 + 0.5 + 0.7 + 0.8) / 4)  # PSNR is not in [0, 1]
    assert t.loc["with VBench", "average"] == pytest.approx(0.6) and t.loc["with VBench", "fig1_score"] == 0.6
    assert t.loc["weight-free", "scored_by"].startswith("weight-free") and t.loc["with VBench", "scored_by"] == "VBench"
    assert report.plot_metrics(t)[-1] == "average" and report.plot_metrics(t)[0].startswith("vbench_")
    assert report.plot_metrics(report.scores_table({"a": own}))[0] == "temporal_flickering"



@pytest.mark.parametrize("family, recipe", [("wan2.1-t2v", "wan2.1-t2v-1.3b"), ("wan2.1-i2v", "wan2.1-i2v-14b"),
                                            ("wan2.2-ti2v", "wan2.2-ti2v-5b"), ("hunyuan-i2v", "hunyuan-i2v"),
                                            ("hunyuan-t2v", None)])
def test_a_pipeline_finds_its_familys_recipe_and_notebook_fields(family, recipe, tmp_path):
    """A real checkpoint's notebook runs start from configs/real/<family>/ (refused where the paper has none), on a
    CPU without DeepSpeed and in fp32, and its evaluations sample the cache's clips at the cache's size."""
    import yaml
    from flgcore import report
    from flgcore.config import FlgError
    pipe = write_tiny_pipeline(tmp_path / "pipe", **FAMILIES[family][0])
    recipe = "hunyuanvideo-i2v" if recipe == "hunyuan-i2v" else recipe
    assert pipelines.recipe_name(pipe) == recipe
    if recipe is None:
        with pytest.raises(FlgError, match="no recipe for this pipeline's family"):
            report.recipe("stage2", str(pipe))
        return
    yml = yaml.safe_load((report.recipe_dir(str(pipe)) / "stage2.yaml").read_text())
    gpu = report.recipe("stage2", str(pipe), device="cuda", drop=[1], steps=None, alpha=0.5)
    assert gpu["zero"] is True and gpu["lr"] == yml["lr"] and gpu["steps"] == yml["steps"] and gpu["alpha"] == 0.5
    assert gpu["model"] == str(pipe) and "data" not in gpu and "selection" not in gpu and gpu["drop"] == [1]
    cpu = report.recipe("stage2", str(pipe), device="cpu", steps=4)
    assert "zero" not in cpu and "offload" not in cpu and cpu["precision"] == "fp32" and cpu["steps"] == 4
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "cache.json").write_text(json.dumps(dict(height=32, width=48, frames=9)))
    ev = report.eval_fields(str(pipe), str(tmp_path / "cache"), n=2, steps=None, view="drop")
    assert ev == dict(height=32, width=48, frames=9, device="cpu", n=2, view="drop", suite=f"cache:{tmp_path / 'cache'}")
    with pytest.raises(FlgError, match="give -p data=<its latent cache>"):
        report.eval_fields(str(pipe), "synth", n=2)


def test_the_testbed_takes_no_recipe_and_the_papers_numbers_stand_below_ours():
    from flgcore import paper, report
    assert report.recipe("stage2", "synth-tiny", device="cpu", steps=4, alpha=None) == dict(model="synth-tiny",
                                                                                            device="cpu", steps=4)
    assert report.eval_fields("synth-tiny", n=8, steps=None) == dict(device="cpu", n=8)
    ours = pd.DataFrame({"average": [0.7, 0.8]}, index=pd.Index([0.0, 1.0], name="alpha"))
    both = report.beside_paper(ours, "table4")
    assert both.loc["ours"].average.tolist() == [0.7, 0.8]
    assert both.loc["Table 4, WanX-TI2V"].loc["1.0", "average"] == 0.791  # the paper's alpha 1 row
    for name, (_, _, dims, rows) in paper.TABLES.items():
        t = paper.table(name)
        assert len(t) == len(rows) and t.filter(like="vbench_").shape[1] == len(dims), name
        assert t.filter(like="vbench_").stack().between(0, 1).all() and t.average.between(0, 1).all(), name



@pytest.mark.slow  # ~1.5 min each on 2 cores; Wan 2.1 I2V runs in the default suite (tests/test_cache.py)
@pytest.mark.parametrize("family, recipe", [("hunyuan-i2v", "hunyuanvideo-i2v"), ("wan2.2-ti2v", "wan2.2-ti2v-5b"),
                                            ("wan2.1-t2v", "wan2.1-t2v-1.3b")])
def test_every_notebook_runs_on_each_familys_tiny_pipeline(family, recipe, tmp_path):
    from tiny_pipelines import FRAMES, write_videos
    from flgcore import report
    from flgcore.cache import CacheConfig, run_cache
    from flgcore.notebooks import run_notebooks
    pipe = write_tiny_pipeline(tmp_path / "pipe", **FAMILIES[family][0])
    run_cache(CacheConfig(pipeline=str(pipe), manifest=str(write_videos(tmp_path)), out=str(tmp_path / "cache"),
                          frames=FRAMES, height=32, width=32, shard_size=3, max_sequence_length=8))
    assert report.recipe_dir(str(pipe)).name == recipe
    params = dict(model=str(pipe), data=str(tmp_path / "cache"), n=2, batch_size=2, sigmas=[0.5], skip=[1],
                  clip_seeds=[0, 1], clip_steps=2, clip_cfg=2.0, eval_n=2, val_n=2, bench_n=1)
    status = run_notebooks("quick", params=params, out=tmp_path / "nb")
    assert set(status.values()) == {"ok"}, status
    methods = pd.read_csv(tmp_path / "nb" / "quick-pipe" / "05_method_comparison" / "methods.csv", index_col=0)
    assert methods.scored_by.str.startswith("weight-free").all() and (methods.sec_per_clip > 0).all()


def read_video(path):
    return _read(path)[0]
