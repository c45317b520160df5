"""VBench adapter: VBench's temporal flickering by hand, the Farneback proxy, the export layout."""
import json

import numpy as np
import pytest

from flgcore import synth
from flgcore.vbench import (dynamic_degree_farneback, export_for_vbench, own_scores, run_vbench, temporal_flickering,
                            to_uint8)


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


def _panning(shifts) -> np.ndarray:
    """A smooth random texture seen through a 64x64 window that moves by `shifts[t]` px before frame t + 1."""
    from scipy import ndimage
    tex = ndimage.gaussian_filter(np.random.default_rng(0).random((64, 160, 3)), sigma=(2, 2, 0))
    tex = ((tex - tex.min()) / (tex.max() - tex.min()) * 255).astype(np.uint8)
    offsets = np.concatenate([[0], np.cumsum(shifts)]).astype(int)
    return np.stack([tex[:, o:o + 64] for o in offsets])


def test_farneback_proxy_uses_vbenchs_frame_sampling_and_thresholds():
    # 64x64: a pair of kept frames moves when its top-5 % flow exceeds 6 * 64 / 256 = 1.5 px (at >= 8 fps)
    slow = _panning([1] * 32)  # 33 frames, 1 px per frame
    assert dynamic_degree_farneback(slow, fps=16)     # every other frame kept: 2 px per pair
    assert not dynamic_degree_farneback(slow, fps=8)  # every frame kept: 1 px per pair
    assert not dynamic_degree_farneback(_panning([2] * 32), fps=4)  # under 8 fps the threshold grows: 3 px
    # 33 frames at 8 fps: dynamic when round(4 * 33 / 16) = 8 pairs move
    assert dynamic_degree_farneback(_panning([2] * 8 + [0] * 24), fps=8)
    assert not dynamic_degree_farneback(_panning([2] * 7 + [0] * 25), fps=8)


def test_export_layout_info_file_and_own_scores(tmp_path, capsys):
    clips = [synth.render(synth.clip_spec(s)) for s in (2000000000, 2000000001, 2000000002)]
    out = export_for_vbench(clips, ["a red square moves left", "a red square moves left", "a blue circle moves up"], tmp_path)
    names = sorted(p.name for p in (out / "videos").iterdir())
    assert names == ["a blue circle moves up-0.mp4", "a red square moves left-0.mp4", "a red square moves left-1.mp4"]
    info = json.loads((out / "vbench_full_info.json").read_text())
    assert [len(i["video_list"]) for i in info] == [2, 1] and "temporal_flickering" in info[0]["dimension"]
    scores = own_scores(out)
    direct = np.mean([temporal_flickering(to_uint8(c)) for c in clips])
    assert scores["n"] == 3 and abs(scores["temporal_flickering"] - direct) < 0.01  # through mp4 compression
    assert run_vbench(out) is None and "VBench is not installed" in capsys.readouterr().out
