"""VBench-I2V adapter for real checkpoints: write videos as VBench expects, run it where it is installed,
and compute the dimensions that need no learned weights ourselves.

VBench cannot live in this environment (it pins numpy<2 and an old transformers, and 15 of its
16 dimensions download weights at run time); it belongs on a GPU box, in its own environment, with its
weights staged (`local=True`, `VBENCH_CACHE_DIR`). So `export_for_vbench` writes `videos/<prompt>-<i>.mp4`
(VBench's naming: the prompt, a dash, the sample index) and `vbench_full_info.json` (prompt_en,
dimension, video_list per prompt), and `run_vbench` calls VBench if it can be imported, else says so in
one line. `temporal_flickering` is VBench's own definition, computed here; `dynamic_degree_farneback` is
a PROXY of VBench's RAFT-based dynamic degree (OpenCV Farneback flow, VBench's frame sampling and thresholds),
not a VBench number.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from .config import FlgError

I2V_DIMENSIONS = ["i2v_subject", "i2v_background", "subject_consistency", "background_consistency",
                  "motion_smoothness", "dynamic_degree", "aesthetic_quality", "imaging_quality", "temporal_flickering"]


def to_uint8(clip) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] (torch or numpy) -> [F, H, W, 3] uint8, as a decoded video file would be."""
    x = np.asarray(clip.detach().cpu() if hasattr(clip, "detach") else clip, dtype=np.float32)
    return ((x.transpose(1, 2, 3, 0) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def temporal_flickering(frames: np.ndarray) -> float:
    """VBench's temporal flickering of one video, frames [F, H, W, 3] uint8:

        (255 - mean_t MAE(frame_t, frame_t+1)) / 255,   MAE over pixels and channels in float32.
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or len(frames) < 2:
        raise FlgError(f"temporal_flickering needs >= 2 uint8 frames [F, H, W, C], got {frames.dtype} {frames.shape}")
    f = frames.astype(np.float32)
    return float((255.0 - np.abs(f[1:] - f[:-1]).mean(axis=(1, 2, 3)).mean()) / 255.0)


def dynamic_degree_farneback(frames: np.ndarray, fps: float = 16.0) -> bool:
    """PROXY of VBench's dynamic degree (which uses RAFT flow), with VBench's frame sampling and thresholds:
    keep every round(fps / 8)-th frame (about 8 per second; Wan's 16-fps videos: every other one); per pair
    of kept frames take the mean of the top 5 % flow magnitudes; the video is dynamic when at least
    round(4 * K / 16) of the pairs, K the number of kept frames, exceed max(1, 8 / fps) * 6 * min(H, W) / 256.
    Farneback flow instead of RAFT: the only difference."""
    import cv2
    frames = frames[::max(1, round(fps / 8))]
    h, w = frames.shape[1:3]
    thresh = max(1.0, 8.0 / fps) * 6.0 * min(h, w) / 256.0
    need = round(4 * len(frames) / 16)
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    moving = 0
    for a, b in zip(gray[:-1], gray[1:]):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        mag = np.sqrt((flow ** 2).sum(-1)).ravel()
        moving += np.sort(mag)[-max(1, int(0.05 * mag.size)):].mean() > thresh  # max(1, .): frames under 20 px
    return len(gray) > 1 and moving >= need


def export_for_vbench(clips: list, prompts: list[str], out: str | Path, fps: int = 16,
                      dimensions: list[str] | None = None) -> Path:
    """Write clips (each [3, F, H, W] in [-1, 1]) as `videos/<prompt>-<i>.mp4`, i counting the samples of
    each prompt, and `vbench_full_info.json`. Returns the output folder."""
    import imageio.v2 as imageio
    if len(clips) != len(prompts):
        raise FlgError(f"{len(clips)} clips but {len(prompts)} prompts")
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    info: dict[str, dict] = {}
    for clip, prompt in zip(clips, prompts):
        if "/" in prompt:
            raise FlgError(f"prompt {prompt!r}: VBench names files after the prompt, so it cannot contain '/'")
        i = counts[prompt] = counts.get(prompt, -1) + 1
        path = out / "videos" / f"{prompt}-{i}.mp4"
        frames = to_uint8(clip)
        imageio.mimwrite(path, list(frames), fps=fps, macro_block_size=1)
        info.setdefault(prompt, dict(prompt_en=prompt, dimension=list(dimensions or I2V_DIMENSIONS), video_list=[]))
        info[prompt]["video_list"].append(str(path))
    (out / "vbench_full_info.json").write_text(json.dumps(list(info.values()), indent=2) + "\n")
    return out


def own_scores(folder: str | Path) -> dict:
    """The weight-free dimensions over `videos/*.mp4`, computed by us from the decoded files."""
    import imageio.v2 as imageio
    flick, dyn = [], []
    for path in sorted(Path(folder, "videos").glob("*.mp4")):
        with imageio.get_reader(path, "ffmpeg") as reader:  # list(reader) asks len(), which is inf for ffmpeg
            fps = float(reader.get_meta_data().get("fps", 16.0))
            frames = np.stack([f for f in reader])
        flick.append(temporal_flickering(frames))
        dyn.append(dynamic_degree_farneback(frames, fps))
    if not flick:
        raise FlgError(f"{folder}/videos: no mp4 files")
    return dict(temporal_flickering=float(np.mean(flick)), dynamic_degree_farneback_proxy=float(np.mean(dyn)), n=len(flick))


def run_vbench(folder: str | Path, name: str = "flgcore", dimensions: list[str] | None = None,
               device: str = "cuda") -> dict | None:
    """Official VBench on an exported folder, where the `vbench` package is importable and its weights are
    staged; otherwise one line saying so, and None."""
    folder = Path(folder)
    if importlib.util.find_spec("vbench") is None:
        print(f"VBench is not installed here: run it in its own environment on {folder}/videos "
              f"(custom_input mode, local=True, full info {folder}/vbench_full_info.json)")
        return None
    from vbench import VBench
    bench = VBench(device, str(folder / "vbench_full_info.json"), str(folder / "vbench_results"))
    bench.evaluate(videos_path=str(folder / "videos"), name=name, dimension_list=dimensions or I2V_DIMENSIONS[2:],
                   local=True, mode="custom_input")
    result = folder / "vbench_results" / f"{name}_eval_results.json"
    return json.loads(result.read_text()) if result.is_file() else None
