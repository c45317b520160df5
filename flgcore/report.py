"""Analysis helpers the notebooks call: cached experiment runs, tables and seaborn figures.

Notebooks stay thin (no `def` in a notebook): every computation they show lives here or in a stage
module. `run(...)` executes a stage once per run folder and reads its metrics afterwards, so that a
notebook executed again reuses what is finished; `evaluated(...)` does the same for `flg eval`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .config import check_values, from_dict
from .importance import scoring_bundle  # noqa: F401  (notebook 01 loads its model as Stage I does)
from .explorer import explorer  # noqa: F401  (the layer-importance explorer, usable in any notebook)
from .notebooks import at_repo_root, testbed_model  # noqa: F401  (at_repo_root: every notebook's first cell)
from .config import FlgError
from .runs import read_json, run_lock, run_status, start_run, write_json
from .selection import (importance_tables, scoring_batches_for, selection_comparison, set_error,  # noqa: F401
                        skip_explorer)  # (notebook 01's block-importance analysis)
from .plots import (baseline_row, plot_contour, plot_heatmap, plot_paired, plot_quality_vs_time,  # noqa: F401
                    plot_selection, plot_sweep, plot_table_bars, plot_u_curve, save_figure)  # (the notebooks' figures)

# the paper's Fig. 1 score (mean of dynamic degree, aesthetic and imaging quality), in SynthBench analogues:
# SynthBench has no aesthetic dimension, so subject_consistency stands in for it
FIG1_SCORE = ["dynamic_degree", "subject_consistency", "imaging_quality"]


def _stage(name: str):
    from .evaluate import EvalConfig, run_eval
    from .importance import Stage1Config, run_stage1
    from .stage2 import Stage2Config, run_stage2
    from .stage3 import Stage3Config, run_stage3
    return {"stage1": (Stage1Config, run_stage1), "stage2": (Stage2Config, run_stage2),
            "stage3": (Stage3Config, run_stage3), "eval": (EvalConfig, run_eval)}[name]


def run(stage: str, reuse=(), launcher="local", **fields) -> dict:
    """Run `stage` (stage1, stage2, stage3, eval) with these config fields unless its run folder already
    holds a finished run of the same config made from the same input weights; returns its metrics.json
    (see `run_folder`, which also takes finished runs of the same config from other folders).

    The inputs (`model`, and Stage II's `selection`) are compared by content (`models.fingerprint`), not by
    name: a notebook executed again after a new teacher was shipped as `synth-tiny` must not show the old
    teacher's results. A folder made with another config or other inputs is removed and run again (a stage
    would otherwise resume from its checkpoints); one with the same, left unfinished, is resumed.

    `launcher`: "local" (this process) or a Slurm launcher YAML (`launch.py`), for every function below."""
    return read_json(run_folder(stage, reuse, launcher, **fields) / "metrics.json")


def run_folder(stage: str, reuse=(), launcher="local", **fields) -> Path:
    """The folder of a finished run of this config: a finished twin in one of the `reuse` folders (apart from
    its `out`: a later notebook takes an earlier one's run rather than training the same model twice), else
    `out`, run there by `run`'s rules (`runs.run_status` decides what a folder holds) by the launcher."""
    from .launch import launcher as launcher_of
    if twin := finished_twin(stage, fields, reuse):
        return twin
    cls, _ = _stage(stage)
    cfg = from_dict(cls, fields)
    check_values(cfg)  # before the folder is made or cleared
    if run_status(cfg, cfg.out) != "finished":
        launcher_of(launcher).run([[(stage, fields)]])
    return Path(cfg.out)


def prepare(stage: str, fields: dict):
    """Make `out` ready for this run, by `run`'s rules: (its config, the folder's status before). A finished
    run is left as it is; a folder of another config or other inputs is cleared; the config and inputs are
    recorded for the stages that do not do it themselves (eval, Stage I)."""
    import shutil
    cls, _ = _stage(stage)
    cfg = from_dict(cls, fields)
    check_values(cfg)
    out = Path(cfg.out)
    status = run_status(cfg, out)
    if status == "finished":
        return cfg, status
    if status == "foreign":
        raise FlgError(f"{out} exists and is not a run folder; choose another `out`")
    if status == "other":
        print(f"{out}: made with another config or other input weights; running it again")
        shutil.rmtree(out)
    start_run(cfg, out)
    return cfg, status


def run_work(work: list[tuple[str, dict]]) -> None:
    """Run each (stage, fields) of a work in this process, in order, unless finished (a local launcher's job). A run
    another process is working on is waited for (`runs.run_lock`), then taken as it finished."""
    for stage, fields in work:
        with run_lock(from_dict(_stage(stage)[0], fields).out):
            cfg, status = prepare(stage, fields)
            if status != "finished":
                _stage(stage)[1](cfg)


def evaluated(reuse=(), launcher="local", **fields) -> dict:
    """`flg eval` with these fields, cached like `run` (and reused from `reuse` like `run_folder`): its metrics,
    and `eval_run`, the folder that holds them and its per-clip scores (what `paired` pairs)."""
    folder = run_folder("eval", reuse, launcher, **fields)
    return dict(read_json(folder / "metrics.json"), eval_run=str(folder))


def run_folders(runs_root: str | Path, notebooks: list[str]) -> list[Path]:
    """Every run folder (stage runs and evaluations) that these notebooks made under runs_root: the `reuse`
    candidates of a later notebook."""
    return sorted(p.parent for nb in notebooks for p in (Path(runs_root) / nb).glob("**/config.yaml"))


# ----------------------------------------------------------------------------- real checkpoints in the notebooks

RECIPE_PATHS = ("model", "data", "out", "selection")  # a recipe's paths: a notebook's own replace them
DEEPSPEED_KEYS = ("zero", "offload")


def recipe_dir(model: str, recipe: str = "") -> Path:
    """The folder of stage configs a real checkpoint's notebook runs start from: `recipe`, else the paper's recipe for
    the model's family, configs/real/<family>/ (`pipelines.recipe_name`)."""
    from .notebooks import repo_root
    from .pipelines import recipe_name, resolve
    if recipe:
        return Path(recipe)
    pipeline, _ = resolve(model)
    if (name := recipe_name(pipeline)) is None:
        raise FlgError(f"{model}: the paper has no recipe for this pipeline's family; pass -p recipe=<a folder with "
                       f"stage2.yaml and stage3.yaml> (see configs/real/)")
    return repo_root() / "configs" / "real" / name


def recipe(stage: str, model: str, recipe: str = "", device: str = "cpu", **fields) -> dict:
    """The config fields a notebook's `stage` runs start from. For a real checkpoint: the family's recipe
    (`recipe_dir`/<stage>.yaml), its paths left out; on a CPU without its DeepSpeed keys (ZeRO-3 needs GPUs) and in
    fp32 (bf16 autocast on a CPU is emulated, and slow). For the testbed: nothing (the stage's defaults). Then the
    `fields` that are not None: the notebook's values (its profile's sizes; a real checkpoint's full profile passes
    None for them, and the recipe's stand)."""
    import yaml
    base: dict = {}
    if not testbed_model(str(model)):
        path = recipe_dir(model, recipe) / f"{stage}.yaml"
        if not path.is_file():
            raise FlgError(f"recipe {path}: not found (a real checkpoint's {stage} runs start from it)")
        base = {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if k not in RECIPE_PATHS}
        if not str(device).startswith("cuda"):
            base = {k: v for k, v in base.items() if k not in DEEPSPEED_KEYS}
            base["precision"] = "fp32"
    return dict(base, model=model, device=device, **{k: v for k, v in fields.items() if v is not None})


def eval_fields(model: str, data: str = "synth", suite: str = "", device: str = "cpu", vbench_python: str = "",
                **fields) -> dict:
    """`flg eval` fields for a notebook's evaluations of what it made from `model`. The testbed: SynthMotion seeds
    (`fields`: n, steps, view, seed_offset...). A real checkpoint: the prompts of `suite` (default: the latent
    cache's own clips, `cache:<data>`), n of them, at the video size the cache was made at (students are trained
    there), with VBench's official dimensions where `vbench_python` names a VBench environment. None fields are
    left out (the evaluation's defaults: 50 Euler steps for a teacher, a student's own steps); n None on a real
    checkpoint is the whole suite."""
    ev = dict(device=device, **{k: v for k, v in fields.items() if v is not None})
    if testbed_model(str(model)):
        return ev
    from .pipelines import image_conditioned, resolve
    from .suites import read_suite
    if not suite:
        if data == "synth":
            raise FlgError(f"{model} is a real checkpoint: give -p data=<its latent cache> (and -p suite=<prompts> "
                           f"to score other prompts than the cache's)")
        suite = f"cache:{data}"
    if data != "synth":
        info = read_json(Path(data) / "cache.json")
        ev = dict({k: info[k] for k in ("height", "width", "frames") if info.get(k)}, **ev)
    if fields.get("n") is None:  # the whole suite
        ev["n"] = len(read_suite(suite, image_conditioned(resolve(model)[0]), fields.get("suite_images")))
    return dict(ev, suite=suite, **({"vbench_python": vbench_python} if vbench_python else {}))


def bench_inputs(ev: dict) -> dict:
    """The prompts and video size of a real checkpoint's evaluations (`eval_fields`), for `bench.time_methods`; {}
    on the testbed (SynthMotion clips)."""
    return {k: ev[k] for k in ("suite", "height", "width", "frames") if k in ev}


def beside_paper(ours: pd.DataFrame, *tables: str) -> pd.DataFrame:
    """Our table with the paper's rows of the same experiment below it (`paper.TABLES`), `source` naming each:
    VBench's dimensions line up where VBench scored ours (`vbench_<dimension>`); SynthBench and the weight-free
    scores are other scales, so their columns stand apart and the paper's are empty there."""
    from . import paper
    rows = [ours.assign(source="ours")] + [paper.table(t).assign(source=paper.TABLES[t][0]) for t in tables]
    both = pd.concat([r.rename(index=str).rename_axis(ours.index.name) for r in rows])
    return both.set_index("source", append=True).swaplevel()


# a real checkpoint's weight-free scores in [0, 1] (flg eval; vbench.METRIC_DEFINITIONS labels each): their mean is
# the "average" of a table without official VBench dimensions, and the table says so in `scored_by`
WEIGHT_FREE = ["temporal_flickering", "dynamic_degree_farneback_proxy", "motion_smoothness_proxy", "first_frame_ssim"]


def real_scores_table(results: dict[str, dict]) -> pd.DataFrame:
    """One row per named `flg eval` of a real checkpoint: the weight-free scores, VBench's dimensions as
    vbench_<dimension> where VBench ran, `average` (of VBench's dimensions, else of the weight-free ones),
    `scored_by`, and the paper's Fig. 1 score (VBench only)."""
    from .vbench import METRIC_DEFINITIONS
    rows = {}
    for name, r in results.items():
        official = {k: v for k, v in (r.get("vbench") or {}).items() if k != "fig1_score"}
        row = {k: r[k] for k in METRIC_DEFINITIONS if k in r}
        row.update({f"vbench_{k}": v for k, v in official.items()})
        own = [row[k] for k in WEIGHT_FREE if k in row]
        row["average"] = float(np.mean(list(official.values()) if official else own)) if official or own else np.nan
        row["scored_by"] = "VBench" if official else "weight-free (VBench's flickering, labelled proxies)"
        row["fig1_score"] = (r.get("vbench") or {}).get("fig1_score", np.nan)
        # evaluations made before metrics.json recorded it: Wan's steps, twice with CFG
        row["nfe"] = r.get("nfe", r.get("steps", np.nan) * (2 if (r.get("guidance_scale") or 1) > 1 else 1))
        rows[name] = dict(row, eval_run=r.get("eval_run"))
    return pd.DataFrame(rows).T.infer_objects()


def plot_metrics(table: pd.DataFrame, synthbench=("text_alignment", "imaging_quality", "dynamic_degree", "average")
                 ) -> list[str]:
    """The columns a notebook's bar charts show: these SynthBench ones on the testbed; for a real checkpoint three of
    VBench's dimensions where it ran, else three weight-free scores, and the average."""
    if "scored_by" not in table:
        return list(synthbench)
    vb = [c for c in table.columns if c.startswith("vbench_")]
    return (vb[:3] if vb else [c for c in WEIGHT_FREE[:3] if c in table]) + ["average"]


def scores_table(results: dict[str, dict], keys: list[str] | None = None) -> pd.DataFrame:
    """One row per named result (SynthBench metrics.json dicts), the dimensions as columns, plus Fig. 1's score
    (a real checkpoint's evaluations: `real_scores_table`)."""
    from .synthbench import DIMENSIONS
    if results and all("definitions" in r for r in results.values()):
        return real_scores_table(results)
    keys = keys or [*DIMENSIONS, "average", "frechet_distance"]
    df = pd.DataFrame([{**{k: r.get(k, np.nan) for k in keys}, "nfe": r.get("nfe", np.nan)} for r in results.values()],
                      index=list(results))
    df["fig1_score"] = df[FIG1_SCORE].mean(axis=1)
    df["eval_run"] = [r.get("eval_run") for r in results.values()]  # where each row's per-clip scores are: `paired`
    return df


def paired(table: pd.DataFrame, baseline="best") -> pd.DataFrame:
    """`table` with each row's paired difference in `average` to the baseline row (`minus_baseline`: row - baseline,
    over the same seeds or prompts) and its 95 % bootstrap interval (`ci95_low`, `ci95_high`), from the per-clip
    scores in the rows' `eval_run` folders: differences of 0.01 that bars on a 0-1 axis hide, with whether they are
    real. `baseline`: a row label, or "best". Rows without an evaluation folder get NaN."""
    from .evaluate import paired_difference, read_clips
    base = baseline_row(table, baseline)
    if not isinstance(table.at[base, "eval_run"], str):
        raise FlgError(f"baseline {base!r} has no evaluation folder to pair with")
    ref = clips_with_average(read_clips(table.at[base, "eval_run"]))
    cols = {"minus_baseline": "a - b", "ci95_low": "ci95_low", "ci95_high": "ci95_high"}
    out = table.drop(columns=list(cols), errors="ignore")
    for col in cols:
        out[col] = np.nan
    for name, run_dir in table["eval_run"].items():
        if isinstance(run_dir, str):
            d = paired_difference(clips_with_average(read_clips(run_dir)), ref).loc["average"]
            for col, src in cols.items():
                out.at[name, col] = d[src]
    return out


# ----------------------------------------------------------------------------- sweeps

def drop_for(stage1_run: str | Path, model, retention: float) -> list[int]:
    """The one-shot drop set for a retention, from a Stage-I run's per-block importance. `model`: a loaded model, or
    a model's path (only its architecture is built, on the meta device: a 14B checkpoint reads no weights)."""
    from .surgery import blocks, complement, select_keep
    if isinstance(model, (str, Path)):
        from .models import skeleton
        model = skeleton(model)
    by_block = pd.read_csv(Path(stage1_run) / "blocks.csv").sort_values("block")
    keep = select_keep(by_block.importance.tolist(), [b.params for b in blocks(model)], retention)
    return complement(model, keep)


def best_value(table: pd.DataFrame | str | Path, key: str) -> float:
    """The value of a swept config field (`key`) whose row scored the highest SynthBench average, from a
    sweep's table or its CSV (notebook 02's alpha.csv, notebook 03's beta1.csv); rows that are not a value
    (the untrained skip baseline) are ignored. The paper chose its alpha = 1 from Table 4 and its beta1 from
    Table 5 the same way; on a testbed where another value wins, the later ablations should start from that
    one rather than from a collapsed model."""
    from .config import FlgError
    if not isinstance(table, pd.DataFrame):
        if not Path(table).is_file():
            raise FlgError(f"{table} not found: run the notebook that writes it first, or pass {key} explicitly")
        table = pd.read_csv(table, index_col=0)
    values = pd.to_numeric(pd.Series(table.index, index=table.index), errors="coerce")
    scores = table["average"][values.notna()].astype(float)
    if scores.empty:
        raise FlgError(f"the {key} table has no trained rows")
    return float(values[scores.idxmax()])


def variants(stage: str, base: dict, named: dict[str, dict], out: str | Path, eval_fields: dict, baseline: str,
             model_subdir: str = "model", launcher="local", jobs: int = 1) -> pd.DataFrame:
    """Run `stage` once per named variant (`base` with the variant's fields, in out/<name>), evaluate what each
    made (eval_fields), and return their scores with each one's paired difference in `average` to `baseline`
    (`paired`). Each variant is reused when finished, like `run`; the unfinished ones go to the launcher at once,
    like a sweep's values (locally `jobs` at a time; with Slurm: one job each, submitted together)."""
    from .launch import launcher as launcher_of
    if baseline not in named:
        raise FlgError(f"baseline {baseline!r} is not one of the variants {list(named)}")
    works = {}
    for name, fields in named.items():
        run_dir = Path(out) / "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
        fields = dict(base, **fields, out=str(run_dir))
        check_values(from_dict(_stage(stage)[0], fields))  # every variant checked before any runs
        works[name] = [(stage, fields), ("eval", dict(eval_fields, model=str(run_dir / model_subdir),
                                                      out=str(run_dir / "eval")))]
    launcher_of(launcher, jobs).run(list(works.values()))
    results = {}
    for name, ((_, fields), (_, ev)) in works.items():  # now these only read the finished run folders
        run(stage, **fields)
        results[name] = evaluated(**ev)
    table = paired(scores_table(results), baseline)
    table.index.name = "variant"
    return table


def clips_with_average(clips: pd.DataFrame) -> pd.DataFrame:
    """Per-clip scores with each clip's `average` (SynthBench writes it; for a real checkpoint's videos: the mean of
    its VBench dimensions where VBench ran, else of the weight-free scores, as `real_scores_table` averages)."""
    if "average" in clips:
        return clips
    cols = [c for c in clips.columns if c.startswith("vbench_")] or [c for c in WEIGHT_FREE if c in clips]
    return clips.assign(average=clips[cols].mean(axis=1))


def choose_stage2(diagnosis: pd.DataFrame, fields: dict[str, dict], folder: str | Path, out: str | Path) -> dict:
    """Notebook 02's Stage II for the later notebooks: of the `variants` in `diagnosis` (scored on validation seeds,
    so the choice is not made on the seeds the later tables report), the one with the highest average, among
    those that keep the notebook's keep set and length (`fields`: name -> its Stage II fields; a variant that sets
    `drop` or `steps` answers a question, it is not a recipe for every retention). Writes out/best_stage2.json:
    the variant, its fields, its model (`folder`/<name>/model) and its validation average."""
    recipes = [n for n in diagnosis.index if not {"drop", "steps"} & set(fields[n])]
    if not recipes:
        raise FlgError("no Stage II variant keeps the notebook's keep set and length: nothing to choose from")
    name = diagnosis.loc[recipes, "average"].astype(float).idxmax()
    model = Path(diagnosis.at[name, "eval_run"]).parent / "model"
    choice = dict(variant=name, fields=fields[name], model=str(model), average=float(diagnosis.at[name, "average"]))
    write_json(Path(out) / "best_stage2.json", choice)
    return choice


def best_stage2(runs_root: str | Path) -> dict:
    """Notebook 02's choice (`choose_stage2`): the Stage II that notebooks 03-05 start from (its `model`) and that
    notebook 04 trains at every retention (its `fields`)."""
    path = Path(runs_root) / "02_stage2_ablations" / "best_stage2.json"
    if not path.is_file():
        raise FlgError(f"{path} not found: run notebook 02 first, or pass stage2_model explicitly")
    return read_json(path)


def finished_twin(stage: str, fields: dict, folders) -> Path | None:
    """The first of `folders` that holds a finished run of this config (apart from its `out`) made from the
    same input weights, or None."""
    folders = list(folders)
    if not folders:
        return None
    cls, _ = _stage(stage)
    for d in map(Path, folders):
        if run_status(from_dict(cls, dict(fields, out=str(d))), d) == "finished":
            return d
    return None


def sweep(stage: str, key: str, values: list, base: dict, out: str | Path, eval_fields: dict,
          model_subdir: str = "model", jobs: int = 1, reuse=(), launcher="local", baseline=None) -> pd.DataFrame:
    """Run `stage` once per value of config field `key` (each in out/<key>_<value>), evaluate what it
    made with `flg eval` (eval_fields: n, steps, view...), and return one SynthBench row per value.

    jobs > 1 runs the values in that many processes at once: a tiny model leaves most of a GPU idle, so
    several runs share one at nearly the speed of one. Each run is a pure function of its config, so the
    table is the same for any `jobs`. With a Slurm launcher every value is a job (its run, then its
    evaluation), all submitted at once.

    A value whose config is that of a finished run in `reuse` (folders of an earlier sweep: notebook 02's
    drop-mode sweep holds the alpha sweep's winner again) takes that run and its evaluation rather than
    training the same model twice.

    `baseline` (a value, or "best"): add each value's paired difference to that value's row (`paired`)."""
    from .launch import launcher as launcher_of
    todo = []
    reuse = list(reuse)
    for v in values:
        tag = f"{key}_{v}".replace(" ", "").replace("[", "").replace("]", "").replace(",", "-")
        fields = dict(base, **{key: v})
        run_dir = finished_twin(stage, fields, reuse) or Path(out) / tag
        todo.append((v, dict(fields, out=str(run_dir)),
                     dict(eval_fields, model=str(run_dir / model_subdir), out=str(run_dir / "eval"))))
    for _, fields, _ev in todo:  # refuse a bad value before anything runs
        check_values(from_dict(_stage(stage)[0], fields))
    launcher_of(launcher, jobs).run([[(stage, fields), ("eval", ev)] for _, fields, ev in todo])
    results = {}
    for v, fields, ev in todo:  # now these only read the finished run folders
        run(stage, **fields)
        results[v if isinstance(v, (int, float, str)) else str(v)] = evaluated(**ev)
    table = scores_table(results)
    table.index.name = key
    return paired(table, baseline) if baseline is not None else table
