"""VBench and VBench-I2V for real checkpoints: write videos as VBench expects, score what needs no learned
weights ourselves, and run official VBench in its own environment.

VBench cannot live in this environment (it pins numpy<2 and transformers 4.33, and 15 of its 16 dimensions
download weights): it runs as a subprocess of the Python the user names (`run_vbench`), on a GPU box with
its weights staged (`local=True`, `VBENCH_CACHE_DIR`), and its results JSON is read back under its own
names (`read_vbench_results`). `export_for_vbench` writes `videos/<prompt>-<i>.mp4` (VBench's naming: the
prompt, a dash, the sample index), `vbench_full_info.json` and, for I2V, `images/<prompt>.png`.

What we compute ourselves is labelled in `METRIC_DEFINITIONS`: VBench's own definition (temporal
flickering), a proxy of a VBench dimension whose network we replace by OpenCV Farneback flow (dynamic
degree, motion smoothness), or a plain flgcore measure (first-frame PSNR/SSIM against the I2V condition).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from .config import FlgError, read_json_file

I2V_DIMENSIONS = ["i2v_subject", "i2v_background", "subject_consistency", "background_consistency",
                  "motion_smoothness", "dynamic_degree", "aesthetic_quality", "imaging_quality", "temporal_flickering"]
T2V_DIMENSIONS = ["subject_consistency", "background_consistency", "aesthetic_quality", "imaging_quality", "object_class",
                  "multiple_objects", "color", "spatial_relationship", "scene", "temporal_style", "overall_consistency",
                  "human_action", "temporal_flickering", "motion_smoothness", "dynamic_degree", "appearance_style"]
I2V_ONLY = ["i2v_subject", "i2v_background", "camera_motion"]  # VBench-I2V's own (vbench2_beta_i2v)
NEEDS_VBENCH_PROMPTS = ["object_class", "multiple_objects", "scene", "appearance_style", "color", "spatial_relationship"]
FIG1_DIMENSIONS = ["dynamic_degree", "aesthetic_quality", "imaging_quality"]

METRIC_DEFINITIONS = {
    "temporal_flickering": "VBench",
    "dynamic_degree_farneback_proxy": "proxy: VBench's dynamic degree with OpenCV Farneback flow instead of RAFT "
                                      "(same frame sampling, top-5 % flow magnitude, threshold and count)",
    "motion_smoothness_proxy": "proxy: VBench's motion smoothness with the dropped odd frames re-created by "
                               "Farneback-flow interpolation instead of the AMT-S network",
    "first_frame_psnr": "flgcore: PSNR (dB, peak 255, 100 when identical) of frame 0 against the conditioning image",
    "first_frame_ssim": "flgcore: SSIM (11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, mean of RGB channels) "
                        "of frame 0 against the conditioning image",
}


def to_uint8(clip) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] (torch or numpy) -> [F, H, W, 3] uint8, as a decoded video file would be."""
    x = np.asarray(clip.detach().cpu() if hasattr(clip, "detach") else clip, dtype=np.float32)
    return ((x.transpose(1, 2, 3, 0) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def _check_frames(frames: np.ndarray, need: int, what: str) -> None:
    ok = isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[3] == 3
    if not ok or len(frames) < need:
        got = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise FlgError(f"{what} needs >= {need} uint8 RGB frames [F, H, W, 3], got {got}")


def _gray(frame: np.ndarray) -> np.ndarray:
    import cv2
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


def _flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Farneback flow [H, W, 2] from grayscale a to b, OpenCV's usual parameters."""
    import cv2
    return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)


def temporal_flickering(frames: np.ndarray) -> float:
    """VBench's temporal flickering of one video, frames [F, H, W, 3] uint8:

        (255 - mean_t MAE(frame_t, frame_t+1)) / 255,   MAE over pixels and channels in float32.
    """
    _check_frames(frames, 2, "temporal_flickering")
    f = frames.astype(np.float32)
    return float((255.0 - np.abs(f[1:] - f[:-1]).mean(axis=(1, 2, 3)).mean()) / 255.0)


def dynamic_degree_farneback(frames: np.ndarray, fps: float = 16.0) -> bool:
    """PROXY of VBench's dynamic degree (which uses RAFT flow), with VBench's frame sampling and thresholds:
    keep every max(1, round(fps / 8))-th frame (about 8 per second; Wan's 16-fps videos: every other one);
    per pair of kept frames take the mean of the top 5 % flow magnitudes; the video is dynamic when at least
    round(4 * K / 16) of the pairs, K the number of kept frames, exceed 6 * min(H, W) / 256.
    Farneback flow instead of RAFT: the only difference (VBench 0.1.5 and its main branch; a July 2024
    commit briefly scaled the threshold by max(1, 8 / fps), and a later one removed that again)."""
    _check_frames(frames, 1, "dynamic_degree_farneback")
    frames = frames[::max(1, round(fps / 8))]
    h, w = frames.shape[1:3]
    thresh = 6.0 * min(h, w) / 256.0
    need = round(4 * len(frames) / 16)
    gray = [_gray(f) for f in frames]
    moving = 0
    for a, b in zip(gray[:-1], gray[1:]):
        mag = np.sqrt((_flow(a, b) ** 2).sum(-1)).ravel()
        moving += np.sort(mag)[-max(1, int(0.05 * mag.size)):].mean() > thresh  # max(1, .): frames under 20 px
    return len(gray) > 1 and moving >= need


def _midframe(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The frame half-way between RGB uint8 frames a and b: each warped half-way along Farneback flow and
    averaged. The flows from the middle frame are approximated from the two end flows as in Super SloMo
    (Jiang et al. 2018, Eq. 4 at t = 1/2): F_t->a = (F_b->a - F_a->b) / 4, F_t->b = -F_t->a."""
    import cv2
    ga, gb = _gray(a), _gray(b)
    to_a = (_flow(gb, ga) - _flow(ga, gb)) / 4
    h, w = ga.shape
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    warp = lambda im, f: cv2.remap(im, gx + f[..., 0], gy + f[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    mid = (warp(a, to_a).astype(np.float32) + warp(b, -to_a)) / 2
    return mid.round().clip(0, 255).astype(np.uint8)


def motion_smoothness_proxy(frames: np.ndarray) -> float:
    """PROXY of VBench's motion smoothness, frames [F, H, W, 3] uint8. VBench drops the odd frames, re-creates
    each from its two even neighbours with the AMT-S interpolation network, and scores
    (255 - mean |re-created - real| over the odd frames) / 255. Same recipe here, the network replaced by
    Farneback-flow interpolation (`_midframe`): smooth motion is predictable from its neighbours, jerky is not.
    Not a VBench number: the interpolator differs, so values are comparable between our videos only."""
    _check_frames(frames, 3, "motion_smoothness_proxy")
    even, odd = frames[0::2], frames[1::2]
    errs = [np.abs(_midframe(a, b).astype(np.float32) - o).mean() for a, b, o in zip(even[:-1], even[1:], odd)]
    return float((255.0 - np.mean(errs)) / 255.0)


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004) of uint8 [H, W, C] images: 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
    K2 = 0.03, L = 255; the map's mean over the valid interior (5 px in from each edge) and the channels."""
    import cv2
    x, y = a.astype(np.float64), b.astype(np.float64)
    blur = lambda z: cv2.GaussianBlur(z, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    m = (2 * mx * my + c1) * (2 * sxy + c2) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    if min(a.shape[:2]) > 10:
        m = m[5:-5, 5:-5]
    return float(m.mean())


def first_frame_fidelity(frames: np.ndarray, image: np.ndarray) -> dict:
    """How faithfully frame 0 reproduces the I2V conditioning image (uint8 [H, W, 3]; resized to the video
    with cv2's area filter if it is not its size): PSNR in dB (peak 255; 100 when identical, so that
    the value stays finite in JSON) and SSIM (`_ssim`)."""
    import cv2
    _check_frames(frames, 1, "first_frame_fidelity")
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise FlgError(f"first_frame_fidelity needs a uint8 RGB image [H, W, 3], got {got}")
    h, w = frames.shape[1:3]
    if image.shape[:2] != (h, w):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    mse = np.mean((frames[0].astype(np.float64) - image) ** 2)
    psnr = 100.0 if mse == 0 else min(100.0, float(10 * np.log10(255.0 ** 2 / mse)))
    return dict(first_frame_psnr=psnr, first_frame_ssim=_ssim(frames[0], image))


def video_scores(frames: np.ndarray, fps: float, image: np.ndarray | None = None) -> dict:
    """One video's row of weight-free scores (keys as in METRIC_DEFINITIONS; the fidelity pair with an image)."""
    row = dict(temporal_flickering=temporal_flickering(frames),
               dynamic_degree_farneback_proxy=float(dynamic_degree_farneback(frames, fps)),
               motion_smoothness_proxy=motion_smoothness_proxy(frames))
    return row | (first_frame_fidelity(frames, image) if image is not None else {})


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """A video file -> (frames [F, H, W, 3] uint8, fps)."""
    import imageio.v2 as imageio
    try:
        with imageio.get_reader(path, "ffmpeg") as reader:  # list(reader) asks len(), which is inf for ffmpeg
            fps = float(reader.get_meta_data().get("fps", 16.0))
            frames = np.stack([f for f in reader])
    except Exception as e:  # imageio/ffmpeg raise many types for a broken file
        raise FlgError(f"{path}: cannot read the video ({type(e).__name__})") from None
    return frames, fps


def score_videos(folder: str | Path, images: dict[str, np.ndarray] | None = None):
    """A pandas DataFrame with one row per `<folder>/videos/*.mp4`: `video` (the file name) and `video_scores`.
    `images` (file name -> conditioning image) adds the first-frame fidelity; it must cover every video."""
    import pandas as pd
    paths = sorted(Path(folder, "videos").glob("*.mp4"))
    if not paths:
        raise FlgError(f"{folder}/videos: no mp4 files")
    if images is not None:
        names = {p.name for p in paths}
        extra = sorted(set(images) - names)
        if extra:
            raise FlgError(f"score_videos: image for {extra[0]!r}, which is not a video in {folder}/videos")
    rows = []
    for p in paths:
        if images is not None and p.name not in images:
            raise FlgError(f"score_videos: no conditioning image for {p.name}")
        frames, fps = read_video(p)
        rows.append(dict(video=p.name) | video_scores(frames, fps, None if images is None else images[p.name]))
    return pd.DataFrame(rows)


def own_scores(folder: str | Path) -> dict:
    """The weight-free dimensions over `videos/*.mp4`, averaged, and `n` (the number of videos)."""
    df = score_videos(folder)
    return {k: float(df[k].mean()) for k in df.columns if k != "video"} | dict(n=len(df))


def save_i2v_image(folder: str | Path, prompt: str, image) -> Path:
    """Write a conditioning image (uint8 [H, W, 3] or PIL) as `<folder>/images/<prompt>.png`, the layout of
    VBench-I2V's custom input (`run_vbench(i2v_images=<folder>/images)`). VBench-I2V keys images by prompt:
    a different image for a prompt already written is an error (the same image again is fine)."""
    from PIL import Image
    im = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
        raise FlgError(f"prompt {prompt!r}: the image must be uint8 [H, W, 3], got {im.dtype} {im.shape}")
    if "/" in prompt:
        raise FlgError(f"prompt {prompt!r}: VBench names files after the prompt, so it cannot contain '/'")
    path = Path(folder) / "images" / f"{prompt}.png"
    if path.is_file():
        if not np.array_equal(np.asarray(Image.open(path).convert("RGB")), im):
            raise FlgError(f"prompt {prompt!r}: two different images (VBench-I2V keys its images by prompt)")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(im).save(path)
    return path


def export_for_vbench(clips: list, prompts: list[str], out: str | Path, fps: int = 16,
                      dimensions: list[str] | None = None, images: list | None = None) -> Path:
    """Write clips (each [3, F, H, W] in [-1, 1]) as `videos/<prompt>-<i>.mp4`, i counting the samples of
    each prompt, and `vbench_full_info.json`. With `images` (one uint8 [H, W, 3] array or PIL image per
    clip) also `images/<prompt>.png`, the folder VBench-I2V's custom input reads (one image per prompt).
    Returns the output folder."""
    import imageio.v2 as imageio
    if len(clips) != len(prompts) or images is not None and len(images) != len(clips):
        raise FlgError(f"{len(clips)} clips but {len(prompts)} prompts" + ("" if images is None else f" and {len(images)} images"))
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    info: dict[str, dict] = {}
    for k, (clip, prompt) in enumerate(zip(clips, prompts)):
        if "/" in prompt:
            raise FlgError(f"prompt {prompt!r}: VBench names files after the prompt, so it cannot contain '/'")
        if images is not None:
            save_i2v_image(out, prompt, images[k])
        i = counts[prompt] = counts.get(prompt, -1) + 1
        path = out / "videos" / f"{prompt}-{i}.mp4"
        imageio.mimwrite(path, list(to_uint8(clip)), fps=fps, macro_block_size=1)
        info.setdefault(prompt, dict(prompt_en=prompt, dimension=list(dimensions or I2V_DIMENSIONS), video_list=[]))
        info[prompt]["video_list"].append(str(path))
    (out / "vbench_full_info.json").write_text(json.dumps(list(info.values()), indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------- official VBench, in its own environment

RUNNER = '''"""Official VBench on one folder of videos: written and started by flgcore.vbench.run_vbench, run by the
Python of VBench's own environment. Arguments: the JSON file named on the command line."""
import inspect
import json
import os
import sys

args = json.load(open(sys.argv[1]))
extra = {}
if args["i2v"]:
    from vbench2_beta_i2v import VBenchI2V as Bench
    if args["mode"] == "custom_input":
        if "custom_image_folder" not in inspect.signature(Bench.evaluate).parameters:
            sys.exit("ERROR: this VBench-I2V takes no custom_image_folder (PyPI vbench <= 0.1.5): "
                     "install VBench from its git repository")
        extra["custom_image_folder"] = args["images"]
    else:
        extra["resolution"] = args["resolution"]
    info = args["full_info"]
else:
    import vbench
    from vbench import VBench as Bench
    info = args["full_info"] or os.path.join(os.path.dirname(vbench.__file__), "VBench_full_info.json")
os.chdir(args["cwd"])
Bench(args["device"], info, args["out"]).evaluate(
    videos_path=args["videos"], name=args["name"], dimension_list=args["dimensions"], local=True, mode=args["mode"], **extra)
'''


def _prompt_of(name: str) -> str:
    """VBench's prompt of a video file name (its get_prompt_from_filename): `<prompt>-<i>.mp4` -> prompt."""
    return re.sub(r"-\d+$", "", Path(name).stem)


def _last_error(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"error|exception", line, re.IGNORECASE)]
    return (errors or lines or ["(empty log)"])[-1]


def run_vbench(folder: str | Path, vbench_python: str, dimensions: list[str], name: str = "flgcore",
               mode: str = "custom_input", i2v_images: str | None = None, device: str = "cuda") -> dict | None:
    """Official VBench (or VBench-I2V, when `i2v_images` is given) on `<folder>/videos`, run by `vbench_python`
    (the Python of VBench's environment, or a wrapper script that starts it) on a runner script written into
    `<folder>/vbench_results/`, its output in `vbench_results/vbench.log`. Returns {dimension: aggregate}
    from `vbench_results/<name>_eval_results.json` (`read_vbench_results` also gives the per-video table);
    None when `dimensions` is empty. VBench loads its weights from VBENCH_CACHE_DIR (and fetches missing ones).

    mode "custom_input": prompts from the file names; VBench-I2V (from VBench's git repository; PyPI's
    0.1.5 lacks it) reads `<i2v_images>/<prompt>.png|.jpg` (`export_for_vbench(images=...)` writes them).
    mode "vbench_standard": VBench's own prompt suite and info file; for VBench-I2V `i2v_images` is its
    `<root>/vbench2_beta_i2v/data/crop/<ratio>`, run from `<root>` with that ratio, as VBench-I2V expects."""
    folder = Path(folder).resolve()
    videos = sorted(p.name for p in (folder / "videos").glob("*.mp4"))
    if not videos:
        raise FlgError(f"{folder}/videos: no mp4 files")
    exe = shutil.which(vbench_python)
    if exe is None:
        raise FlgError(f"vbench_python {vbench_python!r}: not an executable (the Python of VBench's environment)")
    if mode not in ("custom_input", "vbench_standard"):
        raise FlgError(f"VBench mode {mode!r}: expected custom_input or vbench_standard")
    if not re.fullmatch(r"[\w.-]+", name):
        raise FlgError(f"VBench run name {name!r}: letters, digits, '.', '_' and '-' only (it names the results file)")
    unknown = [d for d in dimensions if d not in T2V_DIMENSIONS + I2V_ONLY]
    if unknown:
        raise FlgError(f"VBench dimension {unknown[0]!r}: unknown; known: {', '.join(T2V_DIMENSIONS + I2V_ONLY)}")
    if not dimensions:
        return None
    bad = [d for d in dimensions if d in NEEDS_VBENCH_PROMPTS]
    if mode == "custom_input" and bad:
        raise FlgError(f"VBench dimension {bad[0]!r} needs VBench's own prompts (mode vbench_standard), not custom_input")
    bad = [d for d in dimensions if d in I2V_ONLY]
    if bad and i2v_images is None:
        raise FlgError(f"VBench dimension {bad[0]!r} is VBench-I2V's: it needs i2v_images (the conditioning images)")
    out = folder / "vbench_results"
    # custom_input: VBench never reads the info file, but its constructor wants one; vbench_standard: VBench's own
    args = dict(i2v=i2v_images is not None, mode=mode, device=device, name=name, dimensions=list(dimensions),
                videos=str(folder / "videos"), out=str(out), cwd=str(out), images=None, resolution=None,
                full_info=str(folder / "vbench_full_info.json") if mode == "custom_input" else None)
    if i2v_images is not None:
        images = Path(i2v_images).resolve()
        if not images.is_dir():
            raise FlgError(f"i2v_images {i2v_images}: no such folder")
        if mode == "custom_input":
            have = {p.stem for p in images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")}
            missing = [v for v in videos if _prompt_of(v) not in have]
            if missing:
                raise FlgError(f"i2v_images {images}: no <prompt>.png|.jpg for {missing[0]} (VBench-I2V keys images by prompt)")
            args["images"] = str(images)
        else:
            if images.parts[-4:-1] != ("vbench2_beta_i2v", "data", "crop"):
                raise FlgError(f"i2v_images {images}: vbench_standard needs VBench-I2V's <root>/vbench2_beta_i2v/data/crop/<ratio>")
            root = images.parents[3]
            info = root / "vbench2_beta_i2v" / "vbench2_i2v_full_info.json"
            if not info.is_file():
                raise FlgError(f"i2v_images {images}: VBench-I2V's info file {info} is missing")
            args.update(cwd=str(root), full_info=str(info), resolution=images.name)
    out.mkdir(parents=True, exist_ok=True)
    results = out / f"{name}_eval_results.json"
    results.unlink(missing_ok=True)  # never read an earlier run's results as this one's
    (out / "run_vbench.py").write_text(RUNNER)
    (out / "run_vbench.json").write_text(json.dumps(args, indent=2) + "\n")
    log = out / "vbench.log"
    print(f"VBench: {', '.join(dimensions)} on {folder / 'videos'} (log: {log})", file=sys.stderr)
    env = os.environ | dict(PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        rc = subprocess.run([exe, str(out / "run_vbench.py"), str(out / "run_vbench.json")], stdout=f,
                            stderr=subprocess.STDOUT, env=env, cwd=args["cwd"]).returncode
    if rc != 0:
        raise FlgError(f"VBench failed (exit status {rc}): {_last_error(log)} (log: {log})")
    if not results.is_file():
        raise FlgError(f"VBench wrote no {results.name} (log: {log})")
    return read_vbench_results(results)[0]


def _scalar(value, where: str) -> float:
    """A per-video VBench value as a float: numbers and bools (dynamic_degree, human_action) as they are, a
    list of numbers by its mean."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, list) and value and all(isinstance(v, (bool, int, float)) for v in value):
        return float(np.mean(value))
    raise FlgError(f"{where}: per-video value {value!r} is not a number")


def read_vbench_results(path: str | Path):
    """VBench's `<name>_eval_results.json`, {dimension: [aggregate, [{"video_path", "video_results", ...}, ...]]}
    (camera_motion: [aggregate, {type: mean}, [...]]) -> ({dimension: aggregate}, a pandas DataFrame with
    one row per video: `video` (the file name) and one column per dimension, NaN where not scored)."""
    import pandas as pd
    path = Path(path)
    data = read_json_file(path, "VBench results")
    if not isinstance(data, dict):
        raise FlgError(f"VBench results {path}: expected {{dimension: [aggregate, per-video list]}}")
    dims, rows = {}, {}
    for dim, value in data.items():
        where = f"VBench results {path} {dim!r}"
        if not (isinstance(value, list) and len(value) >= 2 and isinstance(value[-1], list)):
            raise FlgError(f"{where}: expected [aggregate, per-video list], got {str(value)[:60]}")
        dims[dim] = _scalar(value[0], where)
        for v in value[-1]:
            if not isinstance(v, dict) or "video_path" not in v or "video_results" not in v:
                raise FlgError(f"{where}: a per-video entry lacks video_path/video_results: {str(v)[:60]}")
            rows.setdefault(Path(v["video_path"]).name, {})[dim] = _scalar(v["video_results"], f"{where} {v['video_path']}")
    table = pd.DataFrame([dict(video=k) | r for k, r in sorted(rows.items())], columns=["video", *dims])
    return dims, table


def fig1_score(dims: dict) -> float | None:
    """The paper's Fig. 1 score: the mean of VBench's dynamic_degree, aesthetic_quality and imaging_quality,
    or None unless all three are present."""
    if any(dims.get(d) is None for d in FIG1_DIMENSIONS):
        return None
    return float(np.mean([dims[d] for d in FIG1_DIMENSIONS]))
