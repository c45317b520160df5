"""The layer-importance explorer: pick blocks to skip and see, live, what it costs (ipywidgets).

`explorer(model, data=..., stage1=...)` returns an `Explorer` that displays as a widget in any notebook: a
toggle per block (grouped by kind: HunyuanVideo's double and single blocks), readouts of the retention (share
of block parameters kept), the theoretical speed-up at a chosen step count and the Eq. 3 error of the skip set
with its standard error; Stage I's Eq. 4 importance bars with the skipped blocks marked, per noise level or
averaged; buttons that fill the toggles with the one-shot and the iterative choice at a retention; the clip
strip (real clip / full model / skip view); and "save selection", a `selection.json` that `flg stage2
--selection` takes.

It adds no math: the scores, the selections and the set errors are Stage I's functions (importance.py). An
update is kept cheap by what does not change between clicks: the full model's block outputs (a skip set's
error runs only the kept blocks after its first skipped one: `importance.set_errors`), the full model's clips,
and every skip set already seen. Clicks in quick succession are debounced into one update, computed in a
worker thread while the readout says it is busy. Without a live frontend (papermill, a static viewer) the
same display carries a PNG snapshot of the current state.
"""
from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import flow, synth
from .config import FlgError
from .importance import (Stage1Config, iterative_path, keep_after, score_blocks, scoring_batches, scoring_bundle,
                         set_errors, summarise)
from .runs import write_json
from .surgery import blocks, check_indices, complement, retention_of, select_keep


def explorer(model, data: str = "synth", stage1: str | Path | None = None, n: int = 8,
             sigmas: list[float] | None = None, seed: int = 2, batch_size: int = 16,
             clip_seeds=(2000000000, 2000000001), clip_steps: int = 8, cfg_scale: float | None = None,
             skip=(), steps: int = 4, retention: float | None = None, out: str | Path = "runs/explorer",
             debounce: float = 0.3, device: str = "cpu", precision: str = "fp32") -> Explorer:
    """The explorer for `model` (a loaded Bundle, "synth-tiny" or a model/checkpoint directory).

    stage1: a Stage-I run folder whose importance tables (and draws, for the iterative choice) it shows; None
    scores the blocks here with Stage I's `score_blocks` on the explorer's own draws. n clips at `sigmas`
    (default: Stage I's) drawn with `seed` give the Eq. 3 error of a skip set (fresh draws: Stage I's seed is
    0). clip_seeds / clip_steps / cfg_scale: the clip strip (on a real checkpoint, `data` a latent cache: the
    cache's first clips, decoded with the pipeline's VAE). skip: the initial skip set; steps: the student step
    count of the speed-up readout; retention: the buttons' budget (default Stage I's, else 0.7); out: where
    "save selection" writes. debounce: seconds of quiet after a click before updating (0: update at once,
    in the calling thread)."""
    bundle = model if hasattr(model, "model") else scoring_bundle(str(model), device, precision)
    skip = check_indices(bundle.model, list(skip), "skipped block index")
    return Explorer(bundle, data, stage1, n, sigmas, seed, batch_size, list(clip_seeds), clip_steps, cfg_scale,
                    skip, steps, retention, Path(out), debounce)


class Explorer:
    """The explorer's state, widgets and update. `skip` (the toggled blocks), `update()`, `fill(method)` and
    `save()` are what the widgets call; tests and scripts call them directly."""

    def __init__(self, bundle, data, stage1, n, sigmas, seed, batch_size, clip_seeds, clip_steps, cfg_scale,
                 skip, steps, retention, out, debounce):
        self.bundle, self.model, self.data, self.out, self.debounce = bundle, bundle.model, data, out, debounce
        self.blocks = blocks(self.model)
        self.params = [b.params for b in self.blocks]
        self.stage1_cfg = None
        if stage1 is not None:
            from .config import from_dict
            import yaml
            run = Path(stage1)
            if not (run / "blocks.csv").is_file():
                raise FlgError(f"{run}: not a finished Stage-I run (no blocks.csv)")
            self.by_block, self.by_sigma = pd.read_csv(run / "blocks.csv"), pd.read_csv(run / "importance.csv")
            self.stage1_cfg = from_dict(Stage1Config, yaml.safe_load((run / "config.yaml").read_text()))
        sigmas = list(sigmas or (self.stage1_cfg.sigmas if self.stage1_cfg else [0.3, 0.7]))
        draws = Stage1Config(data=data, n=n, sigmas=sigmas, seed=seed, batch_size=batch_size)
        self.batches = list(scoring_batches(draws, bundle.encoder))
        if stage1 is None:  # Stage I's scores on these draws
            self.by_sigma, self.by_block = summarise(score_blocks(self.model, self.batches, "eq4", progress=False),
                                                     self.model)
        self.by_block = self.by_block.sort_values("block").reset_index(drop=True)
        self.retention = retention or (self.stage1_cfg.retention if self.stage1_cfg else 0.7)
        self.steps, self.source = steps, "your pick"
        self.clip_seeds, self.clip_steps, self.cfg_scale = clip_seeds, clip_steps, cfg_scale
        self._cache, self._errors, self._clips, self._path = {}, {}, {}, None
        self._real = None
        self.history: list[dict] = []
        self.last_update_s = None
        self._gen, self._timer, self._lock, self._compute = 0, None, threading.Lock(), threading.Lock()
        self._build_widgets(skip)
        self.update()

    # ------------------------------------------------------------------ what the readouts show (Stage I's functions)

    @property
    def skip(self) -> list[int]:
        return [i for i, t in enumerate(self.toggles) if t.value]

    @property
    def sigma(self) -> float | None:
        return None if self.sigma_pick.value == "all" else float(self.sigma_pick.value)

    def errors(self, drop: list[int]) -> pd.DataFrame:
        """Per-sample Eq. 3 / Eq. 4 errors of skipping `drop` on the explorer's draws (cached per set)."""
        key = tuple(sorted(drop))
        if key not in self._errors:
            self._errors[key] = set_errors(self.model, self.batches, list(key), self._cache)
        return self._errors[key]

    def readout(self, drop: list[int] | None = None) -> dict:
        """retention, speed-up and the Eq. 3 error (mean and standard error, at the chosen sigma or over all)."""
        drop = self.skip if drop is None else drop
        keep = complement(self.model, drop)
        err = self.errors(drop)
        if self.sigma is not None:
            err = err[np.isclose(err.sigma, self.sigma)]
        e = err.eq3.to_numpy()
        meta = self.bundle.meta  # the paper's teacher unless the model saved its own: 50 Euler steps with CFG
        teacher = flow.nfe(int(meta.get("steps", 50)), float(meta.get("cfg_scale") or 0.0))
        ret = retention_of(self.model, keep) if keep else 0.0
        return dict(skip=list(drop), kept=keep, retention=ret, steps=self.steps,
                    speedup=teacher / (self.steps * ret) if ret else float("inf"),
                    eq3=float(e.mean()) if len(e) else float("nan"),
                    eq3_se=float(e.std(ddof=1) / np.sqrt(len(e))) if len(e) > 1 else 0.0, n=len(e), sigma=self.sigma)

    def scores(self) -> pd.DataFrame:
        """Stage I's Eq. 4 importance per block (block, group, importance, se) at the chosen sigma or averaged."""
        if self.sigma is None:
            return self.by_block[["block", "group", "importance", "se"]]
        d = self.by_sigma[np.isclose(self.by_sigma.sigma, self.sigma)].sort_values("block")
        return d.rename(columns={"mean": "importance"})[["block", "group", "importance", "se"]].reset_index(drop=True)

    def choice(self, method: str) -> list[int]:
        """The blocks Stage I would drop at the buttons' retention: "oneshot" ranks the shown scores (Stage I's
        keep set when they are averaged over sigma), "iterative" walks the greedy path on Stage I's draws."""
        if method == "oneshot":
            return complement(self.model, select_keep(self.scores().importance.tolist(), self.params, self.retention))
        if method != "iterative":
            raise FlgError(f"method must be 'oneshot' or 'iterative', got {method!r}")
        if self._path is None or self.retention < self._path[0]:  # a path to a lower retention serves higher ones
            cfg = self.stage1_cfg
            pick = list(scoring_batches(cfg, self.bundle.encoder)) if cfg else self.batches
            self._path = (self.retention, iterative_path(self.model, pick, self.retention,
                                                         cfg.objective if cfg else "eq4", progress=False))
        return complement(self.model, keep_after(self.model, self._path[1], self.retention))

    def selection(self) -> dict:
        """The current pick in Stage I's selection.json layout (what `flg stage2 --selection` reads)."""
        r = self.readout()
        return dict(kept=r["kept"], dropped=r["skip"], params_kept=int(sum(self.params[i] for i in r["kept"])),
                    params_total=int(sum(self.params)), retention_target=self.retention, retention=r["retention"],
                    method=self.source, eq3_error=r["eq3"], eq3_se=r["eq3_se"],
                    model=str(self.bundle.root))

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path or self.save_path.value)
        if not complement(self.model, self.skip):
            raise FlgError("a selection must keep at least one block")
        write_json(path, self.selection())
        self.save_status.value = f"saved {path}"
        return path

    # ------------------------------------------------------------------ clips

    def clips(self, drop: list[int]) -> torch.Tensor:
        """The clip strip's clips [B, 3, F, H, W] of the view without `drop` (cached per set)."""
        from .sampling import SampleSpec, sample_cached, sample_seeds
        key = tuple(sorted(drop))
        if key not in self._clips:
            spec = SampleSpec("euler", self.clip_steps, self.cfg_scale, None, None, list(key)).resolve(self.bundle.meta)
            if self.data == "synth":
                self._clips[key] = sample_seeds(self.bundle, spec, self.clip_seeds, progress=False)[0]
            else:
                cache, index = self._latents()
                self._clips[key] = self._decode(sample_cached(self.bundle, spec, cache, index, self.clip_seeds))
        return self._clips[key]

    def _latents(self):
        from .data import LatentCache
        cache = LatentCache(self.data)
        if len(self.clip_seeds) > len(cache):
            raise FlgError(f"clip_seeds: {len(self.clip_seeds)} clips asked for, the cache {self.data} holds {len(cache)}")
        return cache, list(range(len(self.clip_seeds)))

    def _decode(self, latents):
        if not hasattr(self, "_decoder"):
            from .cache import latent_decoder
            self._decoder = latent_decoder(self.bundle.root.parent, device=str(next(self.model.parameters()).device))
        return self._decoder(latents)

    def real(self) -> torch.Tensor:
        if self._real is None:
            if self.data == "synth":
                self._real = synth.clips(self.clip_seeds)[0]
            else:
                cache, index = self._latents()
                self._real = self._decode(cache.items(index)[0])
        return self._real

    def strip(self, drop: list[int], width: int = 800, frames: int = 8) -> np.ndarray:
        """The clip strip as one RGB image: per clip, rows real / full / skip view of `frames` evenly spaced
        frames, scaled to `width` pixels (tiny testbed frames enlarged, a real checkpoint's reduced)."""
        from PIL import Image, ImageDraw, ImageFont
        from .sampling import to_uint8
        rows = [("real", self.real()), ("full", self.clips([])), ("skip view", self.clips(drop))]
        n_frames = rows[0][1].shape[2]
        shown = np.unique(np.linspace(0, n_frames - 1, min(frames, n_frames)).round().astype(int))
        lines = [(name, np.concatenate(list(to_uint8(clips[j][:, shown], 1)), axis=1))
                 for j in range(len(rows[0][1])) for name, clips in rows]
        h, w = lines[0][1].shape[:2]
        k, pad, label = width / w, 4, 80
        height = max(1, round(h * k))
        try:
            font = ImageFont.load_default(size=14)
        except (TypeError, OSError):  # a Pillow without FreeType: its small bitmap font
            font = ImageFont.load_default()
        canvas = Image.new("RGB", (label + width, len(lines) * (height + pad) + 3 * pad * len(lines) // 3), "white")
        draw, y = ImageDraw.Draw(canvas), pad
        for i, (name, img) in enumerate(lines):
            if i and i % len(rows) == 0:
                y += 3 * pad  # a gap between clips
            canvas.paste(Image.fromarray(img).resize((width, height), Image.NEAREST if k >= 1 else Image.LANCZOS),
                         (label, y))
            draw.text((4, y + height // 2 - 8), name, fill=(0, 0, 0), font=font)
            y += height + pad
        return np.asarray(canvas.crop((0, 0, label + width, y)))

    # ------------------------------------------------------------------ figures (explicit Figures: no pyplot state)

    def _bars(self, ax, drop: list[int]) -> None:
        d = self.scores()
        colours = {g: f"C{k}" for k, g in enumerate(dict.fromkeys(d.group))}
        ax.bar(d.block, d.importance, yerr=d.se, color=[colours[g] for g in d.group], capsize=2)
        for b in drop:
            ax.bar(b, d.importance[b], color="lightgrey", hatch="//", edgecolor="k")
        ax.set(yscale="log", xlabel="block index (hatched: skipped)", ylabel="Eq. 4 error, block skipped",
               title=f"Stage I importance ({'mean over sigma' if self.sigma is None else f'sigma = {self.sigma:g}'})")
        ax.set_xticks(list(d.block))
        if len(colours) > 1:
            from matplotlib.patches import Patch
            ax.legend(handles=[Patch(color=c, label=g) for g, c in colours.items()], fontsize=8)

    def figure(self):
        """The current state as one static figure: readouts, importance bars and the clip strip."""
        from matplotlib.figure import Figure
        strip = self.strip(self.skip)
        fig = Figure(figsize=(8, 3.0 + 8 * strip.shape[0] / strip.shape[1]))
        top, bottom = fig.subplots(2, 1, height_ratios=[3.0, 8 * strip.shape[0] / strip.shape[1]])
        self._bars(top, self.skip)
        bottom.imshow(strip)
        bottom.axis("off")
        fig.suptitle(self._summary(self.readout()), fontsize=9)
        fig.tight_layout()
        return fig

    @staticmethod
    def _png(fig) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        return buf.getvalue()

    def _summary(self, r: dict) -> str:
        at = "" if r["sigma"] is None else f" at sigma {r['sigma']:g}"
        return (f"skip {r['skip']}: retention {r['retention']:.1%}, theoretical speed-up {r['speedup']:.1f}x at "
                f"{r['steps']} steps, Eq. 3 error{at} {r['eq3']:.4g} ± {r['eq3_se']:.2g} (n={r['n']})")

    # ------------------------------------------------------------------ widgets

    def _build_widgets(self, skip: list[int]) -> None:
        import ipywidgets as w
        small = w.Layout(width="38px", padding="0px")
        self.toggles = [w.ToggleButton(value=b.index in set(skip), description=str(b.index), layout=small,
                                       tooltip=f"block {b.index} ({b.group}, {b.params:,} parameters)")
                        for b in self.blocks]
        groups = list(dict.fromkeys(b.group for b in self.blocks))
        rows = [w.HBox([w.Label("blocks" if g == "block" else f"{g} blocks", layout=w.Layout(width="90px"))] +
                       [t for t, b in zip(self.toggles, self.blocks) if b.group == g], layout=w.Layout(flex_flow="row wrap"))
                for g in groups]
        for t in self.toggles:
            t.button_style = "warning" if t.value else ""
            t.observe(self._on_toggle, "value")
        sig = ["all"] + [f"{s:g}" for s in sorted(self.by_sigma.sigma.unique())]
        self.sigma_pick = w.Dropdown(options=sig, value="all", description="sigma", layout=w.Layout(width="160px"))
        self.ret_slider = w.FloatSlider(value=self.retention, min=0.05, max=1.0, step=0.05, description="retention",
                                        readout_format=".0%", continuous_update=False)
        self.steps_slider = w.IntSlider(value=self.steps, min=1, max=int(self.bundle.meta.get("steps", 50)),
                                        description="steps", continuous_update=False)
        self.buttons = {m: w.Button(description=d) for m, d in (("oneshot", "one-shot"), ("iterative", "iterative"),
                                                                 ("clear", "skip none"))}
        self.readout_html, self.status = w.HTML(), w.HTML()
        self.bars_img, self.clips_img, self.history_html = w.Image(format="png"), w.Image(format="png"), w.HTML()
        self.save_path = w.Text(value=str(self.out / "selection.json"), description="save to",
                                layout=w.Layout(width="420px"))
        save, self.save_status = w.Button(description="save selection", icon="save"), w.Label()
        self.sigma_pick.observe(lambda c: self._schedule(), "value")
        self.steps_slider.observe(lambda c: self._set(steps=c["new"]), "value")
        self.ret_slider.observe(lambda c: setattr(self, "retention", c["new"]), "value")  # the buttons read it
        for m, b in self.buttons.items():
            b.on_click(lambda _, m=m: self._schedule(m, delay=0))
        save.on_click(lambda _: self._guard(self.save))
        for widget, name in ((self.readout_html, "readout"), (self.status, "status"), (self.bars_img, "bars"),
                             (self.clips_img, "clips"), *((t, "toggle") for t in self.toggles)):
            widget.add_class(f"flg-{name}")  # for tests that drive it in a browser
        self.ui = w.VBox([w.HTML("<b>Skip blocks</b> (toggle; Stage I's choices fill them at the retention)"), *rows,
                          w.HBox([self.ret_slider, *self.buttons.values()]), w.HBox([self.steps_slider, self.sigma_pick]),
                          w.HBox([self.readout_html, self.status]), self.bars_img, self.clips_img, self.history_html,
                          w.HBox([self.save_path, save, self.save_status])])
        self.ui.add_class("flg-explorer")

    def _set(self, **kw) -> None:
        for k, v in kw.items():
            setattr(self, k, v)
        self._schedule()

    def _on_toggle(self, change) -> None:
        change["owner"].button_style = "warning" if change["new"] else ""  # skipped: at once, before the update
        if not getattr(self, "_filling", False):
            self.source = "your pick"
            self._schedule()

    def fill(self, method: str) -> list[int]:
        """Set the toggles to Stage I's "oneshot" or "iterative" choice (or "clear") and update."""
        drop = [] if method == "clear" else self.choice(method)
        self._filling = True
        try:
            for i, t in enumerate(self.toggles):
                t.value = i in drop
        finally:
            self._filling = False
        self.source = {"clear": "your pick", "oneshot": "one-shot", "iterative": "iterative"}[method]
        if method != "clear" and self.sigma is not None and method == "oneshot":
            self.source += f" (sigma {self.sigma:g})"
        return drop

    def _schedule(self, method: str | None = None, delay: float | None = None) -> None:
        """Update after `debounce` seconds without another click, in a worker thread (0: now, here)."""
        delay = self.debounce if delay is None else delay
        self.status.value = "<span style='color:#b60'>&#9203; updating&hellip;</span>"
        job = (lambda: (self.fill(method), self.update())) if method else self.update
        if self.debounce <= 0:
            self._guard(job)
            return
        with self._lock:
            self._gen += 1
            if self._timer is not None:
                self._timer.cancel()
            gen = self._gen
            self._timer = threading.Timer(delay, self._run, (gen, job))
            self._timer.daemon = True
            self._timer.start()

    def _run(self, gen: int, job) -> None:
        with self._compute:  # one update at a time; a newer click supersedes a waiting plain update
            if gen == self._gen or job != self.update:
                self._guard(job)

    def _guard(self, job) -> None:
        try:
            job()
        except Exception as e:  # noqa: BLE001 - shown in the widget: a worker thread has no cell to raise into
            self.status.value = f"<span style='color:#c00'>{type(e).__name__}: {e}</span>"
            if self.debounce <= 0:
                raise

    def update(self) -> dict:
        """Recompute the readouts, bars and clip strip for the current toggles; returns the readout."""
        from matplotlib.figure import Figure
        t0 = time.perf_counter()
        drop = self.skip
        r = self.readout(drop)
        self.readout_html.value = f"<code>{self._summary(r)}</code>"
        fig = Figure(figsize=(8, 2.6))
        self._bars(fig.subplots(), drop)
        fig.tight_layout()
        self.bars_img.value = self._png(fig)
        self.status.value = "<span style='color:#b60'>&#9203; sampling the clips&hellip;</span>"  # the error is up
        buf = io.BytesIO()
        from PIL import Image
        Image.fromarray(self.strip(drop)).save(buf, format="png")
        self.clips_img.value = buf.getvalue()
        self.last_update_s = time.perf_counter() - t0
        self.history = ([dict(source=self.source, skip=str(drop), retention=round(r["retention"], 4),
                              eq3=r["eq3"], eq3_se=r["eq3_se"])] + self.history)[:8]
        self.history_html.value = pd.DataFrame(self.history).to_html(index=False, float_format="%.4g")
        self.status.value = f"<span style='color:#070'>updated in {self.last_update_s:.2f} s</span>"
        return r

    def _repr_mimebundle_(self, include=None, exclude=None):
        """The widget for a live frontend; a PNG of the current state for papermill and static viewers."""
        bundle = dict(self.ui._repr_mimebundle_(include=include, exclude=exclude) or {})
        bundle["image/png"] = base64.b64encode(self._png(self.figure())).decode()
        bundle["text/plain"] = self._summary(self.readout())
        return bundle
