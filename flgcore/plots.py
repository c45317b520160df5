"""The notebooks' figures: seaborn and matplotlib drawings of the tables `report` makes (also reached as
`report.plot_*`, `report.save_figure`)."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator

from .config import FlgError


def baseline_row(table: pd.DataFrame, baseline):
    """The label of `baseline` in `table`: a row label, or "best" (the row with the highest `average`)."""
    if isinstance(baseline, str) and baseline == "best":
        return table["average"].astype(float).idxmax()
    if baseline not in table.index:
        raise FlgError(f"baseline {baseline!r} is not a row of the table ({list(table.index)})")
    return baseline


def save_figure(fig, name: str, run_dir: str | Path, figures: str | Path | None = None) -> list[Path]:
    """PNG and PDF into the run folder and, if given, into figures/."""
    paths = []
    for d in [run_dir] + ([figures] if figures else []):
        Path(d).mkdir(parents=True, exist_ok=True)
        for ext in ("png", "pdf"):
            paths.append(Path(d) / f"{name}.{ext}")
            fig.savefig(paths[-1], dpi=150, bbox_inches="tight",
                        metadata={"CreationDate": None} if ext == "pdf" else None)  # the same runs, the same file
    return paths


def plot_u_curve(by_block: pd.DataFrame, ax=None):
    """Fig. 4: importance (Eq. 4 error with the block skipped) against block index, with standard errors."""
    ax = ax or plt.subplots(figsize=(7, 3.2))[1]
    ax.errorbar(by_block.block, by_block.importance, yerr=by_block.se, fmt="o-", capsize=2)
    ax.set(xlabel="block index", ylabel="error with the block skipped", title="Block importance (Fig. 4)")
    return ax.figure


def plot_heatmap(by_sigma: pd.DataFrame, ax=None):
    ax = ax or plt.subplots(figsize=(8, 3))[1]
    grid = by_sigma.pivot(index="sigma", columns="block", values="mean")
    # The error of every skip grows with sigma (the task gets harder), which would hide the blocks'
    # ranking within a row: show each row relative to its mean, so 1 is an average block at that sigma.
    grid = grid.div(grid.mean(axis=1), axis=0)
    grid.index = [f"{s:.2f}" for s in grid.index]
    sns.heatmap(grid, ax=ax, cmap="viridis", cbar_kws=dict(label="error / mean of the row"))
    ax.set(title="Importance per timestep (each sigma relative to its mean)", ylabel="sigma")
    return ax.figure


def plot_selection(selection: pd.DataFrame, ax=None):
    """Eq. 3 error of the subset each selection keeps, against retention (one line per method)."""
    ax = ax or plt.subplots(figsize=(6, 3.2))[1]  # its own figure: seaborn would otherwise draw on the last one
    sns.lineplot(selection, x="retention", y="eq3_error", hue="method", marker="o", ax=ax)
    ax.set(xlabel="retention (share of block parameters kept)", ylabel="Eq. 3 error of the kept subset",
           title="One-shot ranking vs iterative greedy")
    return ax.figure


def plot_table_bars(df: pd.DataFrame, x: str, metrics: list[str], title: str, ax=None):
    ax = ax or plt.subplots(figsize=(8, 3.2))[1]
    long = df.rename_axis(x).reset_index().melt(id_vars=[x], value_vars=metrics, var_name="metric", value_name="score")
    sns.barplot(long, x="metric", y="score", hue=x, ax=ax)
    ax.set(title=title, ylim=(0, 1.05), xlabel="")  # the ticks name the metrics; "metric" would meet the legend
    ax.tick_params(axis="x", rotation=30)
    # below the axes: inside, the legend covers bars near 1.0, where most of these scores lie
    sns.move_legend(ax, "upper center", bbox_to_anchor=(0.5, -0.42), ncol=min(len(df), 4), title=x, frameon=False)
    return ax.figure


def plot_quality_vs_time(table: pd.DataFrame, ax=None):
    """Fig. 2: SynthBench average against measured seconds per clip, one point per method (the table's index)."""
    ax = ax or plt.subplots(figsize=(6, 3.6))[1]
    sns.scatterplot(table.reset_index(names="method"), x="sec_per_clip", y="average", hue="method", s=80, ax=ax)
    score = "SynthBench average" if "scored_by" not in table else f"average ({table.scored_by.iloc[0]})"
    ax.set(xscale="log", xlabel="seconds per clip (measured)", ylabel=score,
           title="Quality vs measured time per clip (Fig. 2)")
    return ax.figure


def plot_contour(grid: pd.DataFrame, value: str | None = None, ax=None):
    """Fig. 1: score over (student steps, retention), with iso-compute lines steps x retention = const. `value`:
    the paper's Fig. 1 score where every student has one (SynthBench, or VBench), else the average."""
    value = value or ("fig1_score" if grid["fig1_score"].notna().all() else "average")
    ax = ax or plt.subplots(figsize=(5.5, 4.2))[1]
    piv = grid.pivot_table(index="retention", columns="steps", values=value)
    S, R = np.meshgrid(piv.columns.values.astype(float), piv.index.values.astype(float))
    if min(piv.shape) >= 2:
        cs = ax.contourf(S, R, piv.values, levels=12, cmap="viridis")
        ax.scatter(S, R, c="w", s=8)
    else:  # a grid one point wide has no contours: show the points
        cs = ax.scatter(S, R, c=piv.values, cmap="viridis", s=120)
        ax.margins(0.3)
    ax.figure.colorbar(cs, ax=ax, label=value)
    for c in sorted({float(s * r) for s in piv.columns for r in piv.index})[::2]:
        s_line = np.linspace(S.min(), S.max(), 50)
        ax.plot(s_line, c / s_line, "w--", lw=0.6)
    if min(piv.shape) >= 2:
        ax.set_ylim(R.min(), R.max())
    ax.set(xlabel="student steps", ylabel="retention (block parameters kept)",
           title="Steps vs retention (Fig. 1); dashed: equal compute")
    return ax.figure


def plot_paired(table: pd.DataFrame, baseline, title: str, ax=None):
    """Each row's paired difference in average to the baseline (a row label, or "best"), with its 95 % interval
    written beside it, on an axis that shows differences of 0.01 (a table from `paired`). Green: above the
    baseline, red: below, grey: the interval holds 0. Rows with no difference (nothing to pair) are left out."""
    base = baseline_row(table, baseline)
    t = table.drop(index=base).dropna(subset=["minus_baseline"]).sort_values("minus_baseline")
    ax = ax or plt.subplots(figsize=(7, 0.45 * len(t) + 1.2))[1]
    err = np.stack([t.minus_baseline - t.ci95_low, t.ci95_high - t.minus_baseline])
    colors = ["tab:green" if lo > 0 else "tab:red" if hi < 0 else "tab:gray" for lo, hi in zip(t.ci95_low, t.ci95_high)]
    # the numbers in the labels: on an axis that must also hold a collapse (-0.7), a 0.01 bar is a sliver
    labels = [f"{n}\n{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for n, d, lo, hi in
              zip(t.index, t.minus_baseline, t.ci95_low, t.ci95_high)]
    ax.barh(labels, t.minus_baseline, xerr=err, color=colors, capsize=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))  # matplotlib's default crowds a narrow panel's tick labels
    ax.tick_params(axis="y", labelsize=8)
    ax.set(title=title, xlabel=f"average minus {base} (95 % paired interval)")
    return ax.figure


def plot_sweep(table: pd.DataFrame, x: str, metrics: list[str], title: str, baseline="best", axes=None):
    """A sweep's scores as bars per metric (left: the levels) and its paired differences in average to the
    baseline (right: whether they are real; `plot_paired`). `axes`: two axes to draw into."""
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(13, 3.4), gridspec_kw=dict(width_ratios=[3, 2], wspace=0.45))
    plot_table_bars(table.rename(index=str), x, metrics, title, ax=axes[0])
    name = (lambda v: f"{x} {v}")  # "alpha 0.5": the paired panel has no legend to say what its rows are
    plot_paired(table.rename(index=name), name(baseline_row(table, baseline)), "paired, against the best", ax=axes[1])
    return axes[0].figure
