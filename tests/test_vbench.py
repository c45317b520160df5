"""VBench adapter: the weight-free metrics (each falls when its property is damaged), the export layout,
VBench's results format, and the bridge to VBench's own environment (against a fake VBench package)."""
import json
import math
import os
import stat
import sys
import textwrap

import numpy as np
import pytest

from flgcore import synth
from flgcore.config import FlgError
from flgcore.vbench import (METRIC_DEFINITIONS, dynamic_degree_farneback, export_for_vbench, fig1_score,
                            first_frame_fidelity, motion_smoothness_proxy, own_scores, read_vbench_results, run_vbench,
                            save_i2v_image, score_videos, temporal_flickering, to_uint8, video_scores)


def test_temporal_flickering_matches_a_hand_computation():
    f = np.zeros((3, 4, 4, 3), np.uint8)
    f[1] = 10
    f[2, :2] = 10  # pair MAEs: 10, then 5 (half the pixels differ by 10)
    assert temporal_flickering(f) == pytest.approx((255 - (10 + 5) / 2) / 255)
    assert temporal_flickering(np.full((5, 4, 4, 3), 7, np.uint8)) == 1.0
    a = np.array([[[[200, 0, 0]]], [[[0, 0, 0]]]], np.uint8)  # 200 on one of 3 channels: MAE 200/3, no uint8 wrap
    assert temporal_flickering(a) == pytest.approx((255 - 200 / 3) / 255)


def test_farneback_proxy_tells_motion_from_a_frozen_clip():
    spec = synth.clip_spec(2000000004)
    moving = to_uint8(synth.render(spec, frames=16, velocity=(2, 1)))
    frozen = np.repeat(moving[:1], 16, axis=0)
    assert dynamic_degree_farneback(moving) and not dynamic_degree_farneback(frozen)


def _panning(shifts, size=64) -> np.ndarray:
    """A smooth random texture seen through a size x size window that moves by `shifts[t]` px before frame t + 1."""
    from scipy import ndimage
    tex = ndimage.gaussian_filter(np.random.default_rng(0).random((size, 400, 3)), sigma=(2, 2, 0))
    tex = ((tex - tex.min()) / (tex.max() - tex.min()) * 255).astype(np.uint8)
    offsets = np.concatenate([[0], np.cumsum(shifts)]).astype(int)
    return np.stack([tex[:, o:o + size] for o in offsets])


def test_farneback_proxy_uses_vbenchs_frame_sampling_and_thresholds():
    # 64x64: a pair of kept frames moves when its top-5 % flow exceeds 6 * 64 / 256 = 1.5 px, at any fps
    slow = _panning([1] * 32)  # 33 frames, 1 px per frame
    assert dynamic_degree_farneback(slow, fps=16)     # every other frame kept: 2 px per pair
    assert not dynamic_degree_farneback(slow, fps=8)  # every frame kept: 1 px per pair
    assert dynamic_degree_farneback(_panning([2] * 32), fps=4)  # under 8 fps every frame is kept, same threshold
    # 33 frames at 8 fps: dynamic when round(4 * 33 / 16) = 8 pairs move
    assert dynamic_degree_farneback(_panning([2] * 8 + [0] * 24), fps=8)
    assert not dynamic_degree_farneback(_panning([2] * 7 + [0] * 25), fps=8)


def test_motion_smoothness_proxy_falls_for_shuffled_and_jerky_motion():
    smooth = _panning([3] * 16)
    rng = np.random.default_rng(1)
    shuffled = smooth[rng.permutation(len(smooth))]
    jerky = _panning(rng.choice([0, 6], 16))  # the same mean speed, in uneven steps
    s = motion_smoothness_proxy(smooth)
    assert motion_smoothness_proxy(shuffled) < s and motion_smoothness_proxy(jerky) < s
    assert motion_smoothness_proxy(np.repeat(smooth[:1], 9, axis=0)) == 1.0
    # the flow interpolation, not a plain average of the neighbours: that would score the smooth pan far lower
    blend = 1 - np.mean([np.abs((a.astype(float) + b) / 2 - o).mean() for a, b, o in zip(smooth[:-2:2], smooth[2::2], smooth[1::2])]) / 255
    assert s > blend + 0.01
    with pytest.raises(FlgError, match="needs >= 3 uint8 RGB frames"):
        motion_smoothness_proxy(smooth[:2])


def test_shuffled_frames_flicker_more_and_a_frozen_clip_has_no_dynamic_degree():
    smooth = _panning([3] * 16)
    shuffled = smooth[np.random.default_rng(1).permutation(len(smooth))]
    frozen = np.repeat(smooth[:1], 17, axis=0)
    ordered, mixed, still = (video_scores(c, fps=8) for c in (smooth, shuffled, frozen))
    assert mixed["temporal_flickering"] < ordered["temporal_flickering"]
    assert mixed["motion_smoothness_proxy"] < ordered["motion_smoothness_proxy"]
    assert ordered["dynamic_degree_farneback_proxy"] == 1.0 and still["dynamic_degree_farneback_proxy"] == 0.0


def test_first_frame_fidelity_falls_when_the_first_frame_is_replaced():
    clip = _panning([3] * 8)
    image = clip[0].copy()
    same = first_frame_fidelity(clip, image)
    assert same == dict(first_frame_psnr=100.0, first_frame_ssim=pytest.approx(1.0))
    noisy = clip.copy()
    noisy[0] = np.clip(clip[0] + np.random.default_rng(0).normal(0, 8, clip[0].shape), 0, 255).astype(np.uint8)
    replaced = clip.copy()
    replaced[0] = clip[5]
    a, b = first_frame_fidelity(noisy, image), first_frame_fidelity(replaced, image)
    assert same["first_frame_psnr"] > a["first_frame_psnr"] > b["first_frame_psnr"]
    assert same["first_frame_ssim"] > a["first_frame_ssim"] > b["first_frame_ssim"]
    # an image at another size is resized to the video's: a 2x copy of frame 0 still matches it closely
    big = np.repeat(np.repeat(image, 2, axis=0), 2, axis=1)
    assert first_frame_fidelity(clip, big)["first_frame_psnr"] > 40


def test_psnr_and_ssim_match_hand_computations():
    a = np.full((1, 16, 16, 3), 100, np.uint8)
    b = np.full((16, 16, 3), 110, np.uint8)  # MSE 100: PSNR = 10 log10(255^2 / 100)
    got = first_frame_fidelity(a, b)
    assert got["first_frame_psnr"] == pytest.approx(10 * math.log10(255 ** 2 / 100))
    c1 = (0.01 * 255) ** 2  # flat images: no variance, SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    assert got["first_frame_ssim"] == pytest.approx((2 * 100 * 110 + c1) / (100 ** 2 + 110 ** 2 + c1))
    with pytest.raises(FlgError, match="needs a uint8 RGB image"):
        first_frame_fidelity(a, b.astype(np.float32))


def test_every_score_is_defined_and_labelled():
    row = video_scores(_panning([3] * 8), fps=16, image=_panning([3] * 8)[0])
    assert set(row) == set(METRIC_DEFINITIONS)
    assert all(v == "VBench" or v.startswith(("proxy: ", "flgcore: ")) for v in METRIC_DEFINITIONS.values())


def _clips():
    return [synth.render(synth.clip_spec(s)) for s in (2000000000, 2000000001, 2000000002)]


PROMPTS = ["a red square moves left", "a red square moves left", "a blue circle moves up"]


def test_export_layout_info_file_and_own_scores(tmp_path):
    clips = _clips()
    out = export_for_vbench(clips, PROMPTS, tmp_path)
    names = sorted(p.name for p in (out / "videos").iterdir())
    assert names == ["a blue circle moves up-0.mp4", "a red square moves left-0.mp4", "a red square moves left-1.mp4"]
    info = json.loads((out / "vbench_full_info.json").read_text())
    assert [len(i["video_list"]) for i in info] == [2, 1] and "temporal_flickering" in info[0]["dimension"]
    scores = own_scores(out)
    direct = np.mean([temporal_flickering(to_uint8(c)) for c in clips])
    assert scores["n"] == 3 and abs(scores["temporal_flickering"] - direct) < 0.01  # through mp4 compression
    assert set(scores) == {"n", "temporal_flickering", "dynamic_degree_farneback_proxy", "motion_smoothness_proxy"}


def test_export_images_and_score_videos_with_images(tmp_path):
    clips = _clips()
    firsts = [to_uint8(c)[0] for c in clips]
    with pytest.raises(FlgError, match="two different images"):
        export_for_vbench(clips, PROMPTS, tmp_path / "bad", images=[firsts[0], firsts[1], firsts[2]])
    out = export_for_vbench(clips, PROMPTS, tmp_path / "ok", images=[firsts[0], firsts[0], firsts[2]])
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a blue circle moves up.png", "a red square moves left.png"]
    assert save_i2v_image(out, "a blue circle moves up", firsts[2]) == out / "images" / "a blue circle moves up.png"
    with pytest.raises(FlgError, match="'a blue circle moves up': two different images"):
        save_i2v_image(out, "a blue circle moves up", firsts[1])
    images = {"a red square moves left-0.mp4": firsts[0], "a red square moves left-1.mp4": firsts[0],
              "a blue circle moves up-0.mp4": firsts[2]}
    df = score_videos(out, images)
    assert list(df["video"]) == sorted(images) and list(df.columns) == ["video", *METRIC_DEFINITIONS]
    row = df.set_index("video")["first_frame_psnr"]
    assert row["a red square moves left-0.mp4"] > 30 > row["a red square moves left-1.mp4"]  # -1 began from seed ...01
    with pytest.raises(FlgError, match="no conditioning image for a red square moves left-1.mp4"):
        score_videos(out, {k: v for k, v in images.items() if not k.endswith("-1.mp4")})
    with pytest.raises(FlgError, match="image for 'x.mp4', which is not a video"):
        score_videos(out, images | {"x.mp4": firsts[0]})


def _results_fixture(videos: str) -> dict:
    """A results file in VBench's own format: {dimension: [aggregate, [{video_path, video_results, ...}]]}, with
    what its dimensions really write: floats, bools (dynamic_degree), extra keys (background_consistency,
    i2v_subject's image_path) and camera_motion's three elements [aggregate, {type: mean}, [...]]."""
    a, b = f"{videos}/a cat-0.mp4", f"{videos}/a cat-1.mp4"
    return {
        "subject_consistency": [0.95, [{"video_path": a, "video_results": 0.96}, {"video_path": b, "video_results": 0.94}]],
        "background_consistency": [0.9, [{"video_path": a, "video_results": 0.9, "video_sim": 9.0, "cnt_per_video": 10}]],
        "dynamic_degree": [0.5, [{"video_path": a, "video_results": True}, {"video_path": b, "video_results": False}]],
        "aesthetic_quality": [0.6, [{"video_path": a, "video_results": 0.62}, {"video_path": b, "video_results": 0.58}]],
        "imaging_quality": [0.7, [{"video_path": a, "video_results": 0.71}, {"video_path": b, "video_results": [0.6, 0.78]}]],
        "i2v_subject": [0.97, [{"image_path": "/img/a cat.png", "video_path": a, "video_results": 0.97}]],
        "camera_motion": [1.0, {"pan_left": 1.0, "static": float("nan")},
                          [{"video_path": b, "video_results": 1.0, "prompt_type": "pan_left", "predict_type": ["pan_left"]}]],
    }


def test_read_vbench_results_in_vbenchs_format(tmp_path):
    path = tmp_path / "flgcore_eval_results.json"
    path.write_text(json.dumps(_results_fixture("/runs/x/videos"), indent=4))
    dims, table = read_vbench_results(path)
    assert dims == dict(subject_consistency=0.95, background_consistency=0.9, dynamic_degree=0.5, aesthetic_quality=0.6,
                        imaging_quality=0.7, i2v_subject=0.97, camera_motion=1.0)
    assert list(table.columns) == ["video", *dims] and list(table["video"]) == ["a cat-0.mp4", "a cat-1.mp4"]
    t = table.set_index("video")
    assert t.loc["a cat-0.mp4", "dynamic_degree"] == 1.0 and t.loc["a cat-1.mp4", "dynamic_degree"] == 0.0
    assert t.loc["a cat-1.mp4", "imaging_quality"] == pytest.approx(0.69)
    assert math.isnan(t.loc["a cat-1.mp4", "i2v_subject"]) and t.loc["a cat-1.mp4", "camera_motion"] == 1.0
    assert fig1_score(dims) == pytest.approx((0.5 + 0.6 + 0.7) / 3)
    assert fig1_score({k: v for k, v in dims.items() if k != "aesthetic_quality"}) is None
    for text, words in [("{", "not JSON"), ("[]", "expected {dimension"), ('{"x": [0.5]}', "expected \\[aggregate"),
                        ('{"x": [0.5, [{"video_path": "a.mp4", "video_results": "high"}]]}', "is not a number")]:
        path.write_text(text)
        with pytest.raises(FlgError, match=words):
            read_vbench_results(path)
    with pytest.raises(FlgError, match="no such file"):
        read_vbench_results(tmp_path / "none.json")


# ----------------------------------------------------------------------------- the bridge, against a fake VBench

FAKE_VBENCH = '''
import json, os

class VBench:
    def __init__(self, device, full_info_dir, output_path):
        self.args = dict(cls=type(self).__name__, device=device, full_info=full_info_dir)
        self.out = output_path
        os.makedirs(output_path, exist_ok=True)

    def evaluate(self, videos_path, name, dimension_list=None, local=False, mode="vbench_standard", **kwargs):
        if "imaging_quality" in dimension_list:
            raise RuntimeError("CUDA out of memory (fake)")
        print("evaluating", videos_path, flush=True)
        videos = sorted(os.path.join(videos_path, v) for v in os.listdir(videos_path) if v.endswith(".mp4"))
        json.dump(self.args | dict(local=local, mode=mode, cwd=os.getcwd(), kwargs=kwargs), open(os.path.join(self.out, "call.json"), "w"))
        results = {d: [0.5, [{"video_path": v, "video_results": i % 2 == 0 if d == "dynamic_degree" else 0.25 * i}
                             for i, v in enumerate(videos)]] for d in dimension_list}
        json.dump(results, open(os.path.join(self.out, name + "_eval_results.json"), "w"), indent=4)
'''

FAKE_I2V = '''
from vbench import VBench

class VBenchI2V(VBench):
    def evaluate(self, videos_path, name, dimension_list=None, custom_image_folder=None, mode="vbench_standard",
                 local=False, read_frame=False, resolution="1-1", **kwargs):
        extra = dict(custom_image_folder=custom_image_folder) if custom_image_folder else dict(resolution=resolution)
        super().evaluate(videos_path, name, dimension_list, local=local, mode=mode, **extra)
'''

OLD_I2V = '''
from vbench import VBench

class VBenchI2V(VBench):  # PyPI vbench 0.1.5's signature: no custom_image_folder, no mode
    def evaluate(self, videos_path, name, dimension_list=None, local=False, read_frame=False, custom_prompt=False,
                 resolution="1-1", **kwargs):
        super().evaluate(videos_path, name, dimension_list, local=local, **kwargs)
'''


@pytest.fixture
def fake_vbench(tmp_path):
    """A stand-in for VBench's environment: a folder holding minimal `vbench` and `vbench2_beta_i2v` packages
    that write results in VBench's format, and a wrapper script that runs this test's Python with that folder
    on its path. It tests our bridge (the subprocess, the paths and arguments handed over, the parsing,
    the error line), not VBench."""
    env = tmp_path / "vbench_env"
    for pkg, code in [("vbench", FAKE_VBENCH), ("vbench2_beta_i2v", FAKE_I2V)]:
        (env / pkg).mkdir(parents=True)
        (env / pkg / "__init__.py").write_text(textwrap.dedent(code))
    python = tmp_path / "vbench-python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{env}" exec "{sys.executable}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return env, str(python)


def _exported(tmp_path):
    clips = [synth.render(synth.clip_spec(s), frames=3) for s in (2000000000, 2000000001)]
    firsts = [to_uint8(c)[0] for c in clips]
    return export_for_vbench(clips, ["a cat", "a dog"], tmp_path / "eval", images=firsts)


def test_run_vbench_runs_vbench_in_its_own_python_and_reads_its_results(tmp_path, fake_vbench):
    env, python = fake_vbench
    out = _exported(tmp_path)
    dims = run_vbench(out, python, ["subject_consistency", "dynamic_degree"], device="cpu")
    assert dims == dict(subject_consistency=0.5, dynamic_degree=0.5)
    call = json.loads((out / "vbench_results" / "call.json").read_text())
    assert call["cls"] == "VBench" and call["device"] == "cpu" and call["local"] is True and call["mode"] == "custom_input"
    assert call["full_info"] == str(out / "vbench_full_info.json")
    _, table = read_vbench_results(out / "vbench_results" / "flgcore_eval_results.json")
    assert list(table["video"]) == ["a cat-0.mp4", "a dog-0.mp4"] and list(table["dynamic_degree"]) == [1.0, 0.0]
    assert "evaluating" in (out / "vbench_results" / "vbench.log").read_text()

    dims = run_vbench(out, python, ["i2v_subject"], name="i2v", i2v_images=str(out / "images"))
    call = json.loads((out / "vbench_results" / "call.json").read_text())
    assert dims == dict(i2v_subject=0.5) and call["cls"] == "VBenchI2V"
    assert call["kwargs"] == dict(custom_image_folder=str(out / "images"))
    assert run_vbench(out, python, []) is None


def test_run_vbench_standard_i2v_runs_from_vbench_i2v_root_with_the_ratio(tmp_path, fake_vbench):
    _, python = fake_vbench
    out = _exported(tmp_path)
    crop = tmp_path / "VBench" / "vbench2_beta_i2v" / "data" / "crop" / "16-9"
    crop.mkdir(parents=True)
    with pytest.raises(FlgError, match="vbench2_i2v_full_info.json is missing"):
        run_vbench(out, python, ["i2v_background"], mode="vbench_standard", i2v_images=str(crop))
    (crop.parents[2] / "vbench2_i2v_full_info.json").write_text("[]")
    run_vbench(out, python, ["i2v_background"], mode="vbench_standard", i2v_images=str(crop))
    call = json.loads((out / "vbench_results" / "call.json").read_text())
    assert call["cwd"] == str(tmp_path / "VBench") and call["kwargs"] == dict(resolution="16-9")
    assert call["full_info"] == str(crop.parents[2] / "vbench2_i2v_full_info.json") and call["mode"] == "vbench_standard"
    with pytest.raises(FlgError, match="vbench_standard needs VBench-I2V's"):
        run_vbench(out, python, ["i2v_background"], mode="vbench_standard", i2v_images=str(out / "images"))


def test_run_vbench_failures_are_one_line_errors(tmp_path, fake_vbench):
    env, python = fake_vbench
    out = _exported(tmp_path)
    log = out / "vbench_results" / "vbench.log"
    with pytest.raises(FlgError) as e:
        run_vbench(out, python, ["imaging_quality"])
    assert "RuntimeError: CUDA out of memory (fake)" in str(e.value) and str(log) in str(e.value)
    assert "\n" not in str(e.value) and "Traceback" in log.read_text()
    (env / "vbench2_beta_i2v" / "__init__.py").write_text(textwrap.dedent(OLD_I2V))
    with pytest.raises(FlgError, match="takes no custom_image_folder .PyPI vbench <= 0.1.5."):
        run_vbench(out, python, ["i2v_subject"], i2v_images=str(out / "images"))
    os.remove(out / "images" / "a dog.png")
    bad = [(dict(vbench_python=str(tmp_path / "no-python")), "not an executable"),
           (dict(dimensions=["i2v_subject"], i2v_images=None), "it needs i2v_images"),
           (dict(dimensions=["i2v_subject"], i2v_images=str(out / "images")), "no <prompt>.png|.jpg for a dog-0.mp4"),
           (dict(dimensions=["object_class"]), "needs VBench's own prompts"),
           (dict(dimensions=["sharpness"]), "dimension 'sharpness': unknown"),
           (dict(mode="vbench_category"), "mode 'vbench_category'"),
           (dict(name="a/b"), "run name 'a/b'")]
    for kw, words in bad:
        args = dict(folder=out, vbench_python=python, dimensions=["subject_consistency"]) | kw
        with pytest.raises(FlgError, match=words):
            run_vbench(**args)
    with pytest.raises(FlgError, match="no mp4 files"):
        run_vbench(tmp_path / "empty", python, ["subject_consistency"])
    run_vbench(out, python, ["subject_consistency"])  # a run that exits cleanly without results is refused,
    (env / "vbench" / "__init__.py").write_text("class VBench:\n    def __init__(self, *a): pass\n"
                                                "    def evaluate(self, *a, **k): pass\n")
    with pytest.raises(FlgError, match="VBench wrote no flgcore_eval_results.json"):  # not read from the last one
        run_vbench(out, python, ["subject_consistency"])


STUBS = {"decord/__init__.py": "class VideoReader: pass\ndef cpu(*a): pass\n",
         "torchvision/__init__.py": "",
         "torchvision/transforms/__init__.py": "import sys\ntransforms = sys.modules[__name__]\nclass _T:\n"
                                               "    def __init__(self, *a, **k): pass\n"
                                               "Compose = Resize = CenterCrop = ToTensor = Normalize = ToPILImage = Lambda = _T\n"
                                               "class InterpolationMode:\n    BICUBIC = BILINEAR = None\n"}


@pytest.mark.skipif(not os.environ.get("FLG_VBENCH_SRC"), reason="FLG_VBENCH_SRC: a git checkout of VBench")
def test_the_bridge_on_vbenchs_own_code_gives_our_temporal_flickering(tmp_path):
    """Our bridge on VBench's real code (the checkout FLG_VBENCH_SRC names), for the one dimension that needs no
    weights: VBench's and VBench-I2V's custom_input runs give per video the temporal flickering we compute.
    decord and torchvision, which VBench imports at module level but temporal flickering never calls, are
    import-only stand-ins, so that VBench's code runs in this environment."""
    for name, code in STUBS.items():
        (tmp_path / "stubs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "stubs" / name).write_text(code)
    python = tmp_path / "vbench-python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{os.environ["FLG_VBENCH_SRC"]}:{tmp_path / "stubs"}" exec "{sys.executable}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    clips = _clips()
    out = export_for_vbench(clips, PROMPTS, tmp_path / "eval", images=[to_uint8(c)[0] for c in (clips[0], clips[0], clips[2])])
    ours = score_videos(out).set_index("video")["temporal_flickering"]
    for kw in (dict(name="t2v"), dict(name="i2v", i2v_images=str(out / "images"))):
        dims = run_vbench(out, str(python), ["temporal_flickering"], device="cpu", **kw)
        _, table = read_vbench_results(out / "vbench_results" / f"{kw['name']}_eval_results.json")
        assert dims["temporal_flickering"] == pytest.approx(ours.mean())
        assert np.allclose(table.set_index("video")["temporal_flickering"].loc[ours.index], ours, atol=1e-6)
