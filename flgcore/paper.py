"""The paper's reported numbers (VBench-I2V), to stand beside ours in the notebooks' tables.

Each table is keyed by the value the notebook sweeps (alpha, beta1, ...), with VBench's dimension names as columns
(`vbench_<dimension>`, as `report.real_scores_table` names official VBench scores) and the paper's own `average`.
"WanX-TI2V" is the paper's name for Wan 2.2 TI2V 5B; its HunyuanVideo tables are on "HunyuanVideo-ATI2V" with the
paper's own 58-image digital-human suite, not the general VBench-I2V prompts.
"""
from __future__ import annotations

import pandas as pd

DIMS = ["i2v_subject", "subject_consistency", "motion_smoothness", "dynamic_degree", "aesthetic_quality",
        "imaging_quality", "temporal_flickering"]
_NO_FLICKER = [d for d in DIMS if d != "temporal_flickering"]  # Tables 1-2 do not report temporal flickering

# name: (caption, the swept key, the dimensions its rows give, {row: their values, the average[, seconds per video]})
TABLES: dict[str, tuple[str, str, list[str], dict]] = {
    # and the seconds per video ("time spent"); its pruning-only rows are other methods (F3-Pruning, ICMD) than ours
    "table2": ("Table 2, WanX-TI2V", "method", _NO_FLICKER, {
        "Euler teacher": [0.961, 0.970, 0.982, 0.461, 0.653, 0.711, 0.790, 885.3],
        "DMD2 (steps only)": [0.948, 0.946, 0.977, 0.160, 0.583, 0.683, 0.716, 35.4],
        "pruning only (F3-Pruning)": [0.938, 0.935, 0.977, 0.300, 0.651, 0.706, 0.751, 396.2],
        "pruning only (ICMD)": [0.951, 0.949, 0.982, 0.363, 0.653, 0.715, 0.769, 396.2],
        "FastLightGen": [0.952, 0.956, 0.983, 0.500, 0.656, 0.717, 0.794, 28.3]}),
    "table4": ("Table 4, WanX-TI2V", "alpha", DIMS, {
        "teacher": [0.959, 0.965, 0.991, 0.309, 0.663, 0.709, 0.983, 0.797],
        0.0: [0.957, 0.964, 0.990, 0.205, 0.648, 0.711, 0.984, 0.780],
        0.3: [0.959, 0.969, 0.991, 0.224, 0.653, 0.712, 0.985, 0.785],
        0.5: [0.959, 0.968, 0.991, 0.244, 0.652, 0.712, 0.983, 0.780],
        0.7: [0.959, 0.965, 0.990, 0.256, 0.654, 0.712, 0.983, 0.788],
        1.0: [0.961, 0.970, 0.991, 0.268, 0.655, 0.711, 0.984, 0.791]}),
    "table5_beta1": ("Table 5, WanX-TI2V, beta2 0.25", "beta1", DIMS, {
        1.5: [0.957, 0.973, 0.988, 0.179, 0.663, 0.711, 0.985, 0.779],
        2.5: [0.957, 0.966, 0.988, 0.268, 0.652, 0.714, 0.983, 0.790],
        3.5: [0.952, 0.956, 0.983, 0.500, 0.656, 0.717, 0.975, 0.820],
        4.5: [0.957, 0.965, 0.987, 0.285, 0.624, 0.713, 0.983, 0.788]}),
    "table5_beta2": ("Table 5, WanX-TI2V, beta1 3.5", "beta2", DIMS, {
        0.0: [0.952, 0.956, 0.983, 0.459, 0.646, 0.710, 0.978, 0.812],
        0.25: [0.952, 0.956, 0.983, 0.500, 0.656, 0.717, 0.975, 0.820],
        0.5: [0.957, 0.959, 0.986, 0.518, 0.638, 0.717, 0.976, 0.822],
        0.75: [0.927, 0.886, 0.961, 1.000, 0.584, 0.666, 0.918, 0.848],
        1.0: [0.909, 0.876, 0.945, 1.000, 0.572, 0.652, 0.909, 0.838]}),
    "table8_beta1": ("Table 8, HunyuanVideo-ATI2V, beta2 0.25", "beta1", DIMS, {
        1.0: [0.997, 0.959, 0.995, 0.052, 0.585, 0.695, 0.991, 0.753],
        2.0: [0.962, 0.967, 0.994, 0.512, 0.586, 0.702, 0.991, 0.816],
        3.0: [0.942, 0.950, 0.992, 0.744, 0.573, 0.699, 0.987, 0.841],
        4.0: [0.963, 0.962, 0.994, 0.755, 0.570, 0.688, 0.991, 0.846],
        5.0: [0.924, 0.931, 0.992, 0.837, 0.561, 0.678, 0.986, 0.844]}),
    "table8_beta2": ("Table 8, HunyuanVideo-ATI2V, beta1 2.0", "beta2", DIMS, {
        0.0: [0.947, 0.941, 0.992, 0.667, 0.585, 0.687, 0.986, 0.829],
        0.25: [0.962, 0.967, 0.994, 0.512, 0.586, 0.702, 0.991, 0.816],
        0.5: [0.962, 0.962, 0.994, 0.217, 0.584, 0.693, 0.990, 0.771],
        1.0: [0.966, 0.970, 0.996, 0.000, 0.587, 0.704, 0.995, 0.745]}),
    # Table 6's pruning ratio is the share of parameters removed: 30 % is retention 0.7
    "table6": ("Table 6, WanX-TI2V", "row", DIMS, {
        "Stage II only (28 steps), retention 0.7": [0.961, 0.970, 0.991, 0.268, 0.655, 0.711, 0.984, 0.791],
        "Stage III (4 steps), retention 0.7": [0.960, 0.966, 0.987, 0.378, 0.658, 0.712, 0.977, 0.805],
        "Stage II only (28 steps), retention 0.5": [0.958, 0.964, 0.988, 0.174, 0.632, 0.692, 0.989, 0.771],
        "Stage III (4 steps), retention 0.5": [0.957, 0.958, 0.971, 0.273, 0.649, 0.701, 0.976, 0.784],
        "Stage II only (28 steps), retention 0.3": [0.959, 0.959, 0.965, 0.064, 0.552, 0.591, 0.983, 0.725],
        "Stage III (4 steps), retention 0.3": [0.955, 0.958, 0.953, 0.132, 0.579, 0.619, 0.970, 0.738]}),
    "table7": ("Table 7, HunyuanVideo-ATI2V", "retention", DIMS, {
        1.0: [0.965, 0.984, 0.993, 0.696, 0.603, 0.722, 0.982, 0.849],
        0.7: [0.966, 0.972, 0.996, 0.622, 0.571, 0.693, 0.982, 0.829],
        0.5: [0.948, 0.979, 0.996, 0.501, 0.538, 0.553, 0.977, 0.785],
        0.3: [0.949, 0.967, 0.993, 0.249, 0.465, 0.519, 0.952, 0.728]}),
    "table9": ("Table 9, HunyuanVideo-ATI2V", "teacher", DIMS, {
        "pruned": [0.947, 0.941, 0.992, 0.667, 0.585, 0.687, 0.986, 0.829],
        "unpruned": [0.956, 0.932, 0.989, 0.670, 0.525, 0.612, 0.980, 0.809]}),
}


def table(name: str) -> pd.DataFrame:
    """One of the paper's tables: rows keyed as its sweep is, `vbench_<dimension>` columns and the paper's average."""
    caption, key, dims, rows = TABLES[name]
    columns = [f"vbench_{d}" for d in dims] + ["average", "sec_per_clip"]  # Table 2 alone reports the time
    df = pd.DataFrame([dict(zip(columns, v)) for v in rows.values()],
                      index=pd.Index(list(rows), name=key))
    df["scored_by"] = f"the paper ({caption}, VBench-I2V)"
    return df
