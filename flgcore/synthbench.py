"""SynthBench: weight-free, ground-truth-aware analogues of VBench-I2V dimensions for SynthMotion clips.

The analyser segments each frame with what the renderer knows (a flat background estimated from
the border, one subject: the largest connected blob of non-background pixels) and measures the
subject's colour, fill ratio (square ~1, circle ~0.8, triangle ~0.55), area and centroid. Every
dimension is in [0, 1], higher is better, and is named after its VBench-I2V analogue:

  i2v_subject          frame 0 reproduces the condition image (compared after a light blur)
  subject_consistency  the subject keeps its colour, shape and size across frames
  motion_smoothness    the centroid path has no acceleration (constant velocity, like the renderer)
  dynamic_degree       share of frame pairs in which the subject moves (> 0.5 px)
  imaging_quality      pixels are clean (background or subject colour), near edges and overall
  temporal_flickering  the static background does not change between frames
  text_alignment       the fitted velocity has the caption's direction and speed
  average              mean of the seven

plus `frechet_distance` between analyser features of generated and real clips. Scales (e.g. a
background change of 0.08 per frame scores 0 on flickering) are constants below, chosen once from
what is visible in a 32x32 clip, never from a model's scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from . import synth

DIMENSIONS = ("i2v_subject", "subject_consistency", "motion_smoothness", "dynamic_degree",
              "imaging_quality", "temporal_flickering", "text_alignment")
# Tolerances, in [0, 1] RGB units and pixels.
SUBJECT_THRESHOLD = 0.2   # a pixel farther than this from the background colour belongs to a subject
COLOR_TOL, FILL_TOL, AREA_TOL = 0.15, 0.12, 0.25
# i2v_subject compares frame 0 with the condition image after a Gaussian blur (robust to softness, like
# VBench's DINO similarity, yet sensitive to colour and position): the RMSE of a 2-px shift of the subject,
# measured over held-out clips (0.052), scores 0.5.
I2V_SMOOTH, I2V_TOL = 1.0, 0.0625
CLEAN_TOL = 0.08          # a pixel within this of the background or subject colour is clean
ACCEL_TOL = 1.0           # px/frame^2 of mean centroid acceleration that scores exp(-1)
MOVE_MIN = 0.5            # px a subject must move between frames to count as dynamic
FLICKER_ZERO = 0.08       # mean background change per frame that scores 0
SPEED_TOL = 0.5           # px/frame: the gap between "slowly" (1) and "quickly" (2) is two of these
MAX_AREA, MAX_SPREAD = 0.4, 0.15  # a subject covers under 40% of the frame and is flat-coloured


@dataclass
class Subject:
    color: np.ndarray   # mean RGB of its most saturated half, minus the background colour
    fill: float         # area / bounding-box area
    area: float
    centroid: np.ndarray  # (x, y) in pixels
    mask: np.ndarray


def to_frames(clip: torch.Tensor | np.ndarray) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> [F, H, W, 3] in [0, 1] (float64)."""
    c = clip.detach().cpu().numpy() if torch.is_tensor(clip) else np.asarray(clip)
    return np.clip((c.astype(np.float64).transpose(1, 2, 3, 0) + 1) / 2, 0, 1)


def background(frame: np.ndarray) -> np.ndarray:
    border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]])
    return np.median(border, axis=0)


def subject(frame: np.ndarray, bg: np.ndarray) -> Subject | None:
    """The largest blob of non-background pixels, if it looks like a flat-coloured shape."""
    d = np.linalg.norm(frame - bg, axis=-1)
    labels, n = ndimage.label(d > SUBJECT_THRESHOLD)
    if n == 0:
        return None
    sizes = ndimage.sum(np.ones_like(d), labels, range(1, n + 1))
    blob = labels == (1 + int(np.argmax(sizes)))
    # Re-threshold at half the blob's contrast, so that a soft edge neither grows nor shrinks the shape.
    mask = blob & (d > 0.5 * np.median(d[blob]))
    area = float(mask.sum())
    if area < 3 or area > MAX_AREA * d.size:
        return None
    core = mask & (d >= np.median(d[mask]))  # the most saturated half: the shape's own colour
    color = frame[core].mean(axis=0) - bg    # relative to the background: a global brightness shift cancels
    if frame[core].std(axis=0).max() > MAX_SPREAD:
        return None  # not a flat-coloured shape (e.g. a blob of noise)
    ys, xs = np.nonzero(mask)
    fill = area / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    return Subject(color, fill, area, np.array([xs.mean(), ys.mean()]), mask)


def _gauss(d: float, tol: float) -> float:
    return float(np.exp(-(d / tol) ** 2))


def subject_similarity(a: Subject | None, b: Subject | None) -> float:
    """1 for the same colour, shape and size; 0 when either subject is missing."""
    if a is None or b is None:
        return 0.0
    return (_gauss(np.linalg.norm(a.color - b.color), COLOR_TOL) * _gauss(a.fill - b.fill, FILL_TOL)
            * _gauss((a.area - b.area) / max(a.area, b.area), AREA_TOL))


def _cleanliness(frame: np.ndarray, bg: np.ndarray, subj: Subject | None) -> tuple[float, float]:
    """Mean clean-pixel score in a 2-px band around the subject's edge, and over the whole frame."""
    d = np.linalg.norm(frame - bg, axis=-1)
    if subj is not None:
        d = np.minimum(d, np.linalg.norm(frame - (bg + subj.color), axis=-1))
    clean = np.exp(-(d / CLEAN_TOL) ** 2)
    if subj is None:
        return float(clean.mean()) * 0.5, float(clean.mean())  # no subject to be sharp about
    band = ndimage.binary_dilation(subj.mask, iterations=2) & ~ndimage.binary_erosion(subj.mask, iterations=2)
    return float(clean[band].mean()), float(clean.mean())


def analyse(clip, spec: synth.ClipSpec, cond_image=None) -> dict:
    """Score one clip [3, F, H, W] in [-1, 1] against its spec; `cond_image` [3, H, W] defaults to the spec's."""
    frames = to_frames(clip)
    F = len(frames)
    cond = to_frames(synth.render(spec, frames=1, size=frames.shape[1]) if cond_image is None
                      else np.asarray(cond_image)[:, None])[0]
    bgs = [background(f) for f in frames]
    subs = [subject(f, b) for f, b in zip(frames, bgs)]

    smooth = lambda f: ndimage.gaussian_filter(f, sigma=(I2V_SMOOTH, I2V_SMOOTH, 0))
    i2v = _gauss(float(np.sqrt(((smooth(frames[0]) - smooth(cond)) ** 2).mean())), I2V_TOL)
    consistency = float(np.mean([subject_similarity(subs[t], subs[0]) for t in range(1, F)]))

    present = [s is not None for s in subs]
    cents = np.array([s.centroid if s is not None else [np.nan, np.nan] for s in subs])
    accel = [np.linalg.norm(cents[t + 1] - 2 * cents[t] + cents[t - 1]) for t in range(1, F - 1)]
    accel = [a if np.isfinite(a) else 10 * ACCEL_TOL for a in accel]  # a missing subject is a jump
    smoothness = _gauss(float(np.mean(accel)), ACCEL_TOL)

    moves = np.linalg.norm(np.diff(cents, axis=0), axis=1)
    dynamic = float(np.mean(np.nan_to_num(moves, nan=0.0) > MOVE_MIN))

    clean = [_cleanliness(f, b, s) for f, b, s in zip(frames, bgs, subs)]
    imaging = 0.5 * float(np.mean([c[0] for c in clean])) + 0.5 * float(np.mean([c[1] for c in clean]))

    changes = []
    for t in range(F - 1):  # background pixels of both frames, away from either subject
        busy = np.zeros(frames.shape[1:3], bool)
        for s in (subs[t], subs[t + 1]):
            if s is not None:
                busy |= ndimage.binary_dilation(s.mask, iterations=1)
        static = ~busy
        if static.any():
            changes.append(np.abs(frames[t + 1][static] - frames[t][static]).mean())
    flicker = max(0.0, 1 - float(np.mean(changes)) / FLICKER_ZERO) if changes else 0.0

    v_expected = np.array(spec.velocity, float)
    ok = np.array(present)
    if ok.sum() >= 2:
        ts = np.arange(F)[ok]
        v_fit = np.array([np.polyfit(ts, cents[ok, k], 1)[0] for k in range(2)])
    else:
        v_fit = np.zeros(2)
    speed = np.linalg.norm(v_fit)
    direction = max(0.0, float(v_fit @ v_expected) / (speed * np.linalg.norm(v_expected))) if speed > 1e-6 else 0.0
    text = direction * _gauss(speed - np.linalg.norm(v_expected), SPEED_TOL)

    scores = dict(i2v_subject=i2v, subject_consistency=consistency, motion_smoothness=smoothness,
                  dynamic_degree=dynamic, imaging_quality=imaging, temporal_flickering=flicker, text_alignment=text)
    scores["average"] = float(np.mean([scores[k] for k in DIMENSIONS]))
    s0 = next((s for s in subs if s is not None), None)
    features = np.concatenate([
        s0.color if s0 is not None else np.zeros(3), [s0.fill if s0 else 0.0, (s0.area if s0 else 0.0) / 50],
        v_fit, [speed, float(np.mean(accel)), float(np.mean(ok))], bgs[0],
        [np.mean([c[0] for c in clean]), np.mean(changes) if changes else 1.0]])
    return dict(scores=scores, features=features)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, D] and b [M, D]."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # trace sqrt(ca cb) through the symmetric form sqrt(ca)^T cb sqrt(ca), which stays real
    w, v = np.linalg.eigh(ca)
    sa = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(sa @ cb @ sa), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * tr_sqrt)


def evaluate(clips, specs: list[synth.ClipSpec], cond_images=None, real=None) -> tuple[dict, list[dict]]:
    """Score a batch of clips: (aggregate dict, per-clip rows). `real` clips give the Fréchet distance
    (default: the ground-truth renders of the same specs)."""
    rows, feats = [], []
    for i, (clip, spec) in enumerate(zip(clips, specs)):
        r = analyse(clip, spec, None if cond_images is None else cond_images[i])
        rows.append(dict(seed=spec.seed, caption=spec.caption, **r["scores"]))
        feats.append(r["features"])
    agg = {k: float(np.mean([r[k] for r in rows])) for k in (*DIMENSIONS, "average")}
    if len(specs) >= 4:
        real = real if real is not None else np.stack([synth.render(s) for s in specs])
        real_feats = np.stack([analyse(c, s)["features"] for c, s in zip(real, specs)])
        agg["frechet_distance"] = frechet_distance(np.stack(feats), real_feats)
    agg["n"] = len(rows)
    return agg, rows
