"""The notebooks: parameters named like config fields, thin (no defs), no outputs, and every one runs."""
import dataclasses
import json

import pandas as pd
import pytest
import torch
import yaml

from flgcore.bench import BenchConfig
from flgcore.evaluate import EvalConfig
from flgcore.importance import Stage1Config
from flgcore.notebooks import NOTEBOOK_DIR, ORDER, PROFILES, parameters_of, run_notebooks
from flgcore.stage2 import Stage2Config
from flgcore.stage3 import Stage3Config

FIELDS = {f.name for c in (Stage1Config, Stage2Config, Stage3Config, EvalConfig) for f in dataclasses.fields(c)}
PREFIXED = {"eval_": EvalConfig, "bench_": BenchConfig, "clip_": EvalConfig, "stage3_": Stage3Config, "val_": EvalConfig}
SWEEPS = {"lengths": "steps"}  # sweeps whose name is not the field's plural: Stage II lengths
# notebook-level inputs that are not one config's field: where to write, which earlier run to read, and which
# folder of stage configs a real checkpoint's runs start from
NOTEBOOK_INPUTS = {"out", "figures", "runs_root", "stage1_run", "stage2", "stage2_model", "skip", "clip_seeds", "jobs", "launcher",
                   "recipe"}


def named_like_a_field(name: str) -> bool:
    if name in FIELDS or name in NOTEBOOK_INPUTS or SWEEPS.get(name) in FIELDS:
        return True
    if name.endswith("s") and name[:-1] in FIELDS:  # a sweep over that field: alphas, beta2s, retentions
        return True
    return any(name.startswith(p) and name[len(p):] in {f.name for f in dataclasses.fields(c)}
               for p, c in PREFIXED.items())


@pytest.mark.parametrize("name", ORDER)
def test_notebook_is_thin_parameterised_and_clean(name):
    path = NOTEBOOK_DIR / f"{name}.ipynb"
    params = parameters_of(path)
    assert params, "no papermill parameters cell"
    assert [p for p in params if not named_like_a_field(p)] == []
    assert set(PROFILES["full"][name]) <= set(params)
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "committed with outputs"
    src = "\n".join("".join(c["source"]) for c in code)
    assert "def " not in src and "class " not in src


TINY = {"n": 4, "sigmas": [0.5], "retentions": [0.7], "clip_steps": 2, "clip_seeds": [2000000000], "steps": 2,
        "batch_size": 2, "eval_n": 2, "eval_steps": 2, "alphas": [1.0], "drop_modes": ["whole_set"],
        "beta1s": [3.5], "beta2s": [0.25], "student_steps": [1], "bench_n": 1, "bench_repeats": 1, "val_n": 2,
        "lengths": [3], "lrs": []}


@pytest.mark.notebooks
def test_every_notebook_runs_end_to_end(tmp_path):
    status = run_notebooks("quick", params=TINY, out=tmp_path)
    assert status == {name: "ok" for name in ORDER}, status
    assert (tmp_path / "quick" / "01_block_importance" / "block_importance.png").is_file()
    assert (tmp_path / "quick" / "04_steps_vs_retention" / "grid.csv").is_file()
    diagnosis = pd.read_csv(tmp_path / "quick" / "02_stage2_ablations" / "diagnosis.csv", index_col=0)
    assert diagnosis.loc["frozen, alpha 1", "minus_baseline"] == 0 and "3 steps" in diagnosis.index
    assert diagnosis[["ci95_low", "ci95_high"]].notna().all().all()
    # notebooks 03-05 start from the best variant on the validation seeds, and 04 trains it at every retention
    choice = json.loads((tmp_path / "quick" / "02_stage2_ablations" / "best_stage2.json").read_text())
    assert choice["variant"] in diagnosis.index and choice["variant"] != "3 steps"
    assert choice["average"] == diagnosis.drop(index=["3 steps", "iterative keep set"]).average.max()
    s3 = yaml.safe_load((tmp_path / "quick" / "03_stage3_ablations" / "beta1_3.5" / "config.yaml").read_text())
    assert s3["model"] == choice["model"]
    assert not (tmp_path / "quick" / "04_steps_vs_retention" / "stage2_r0.7").exists()  # notebook 02's run, reused
    grid = pd.read_csv(tmp_path / "quick" / "04_steps_vs_retention" / "grid.csv")
    assert (grid.minus_baseline <= 0).all() and grid.ci95_low.notna().all()  # every student against the best one
    # notebook 05's FastLightGen student is notebook 03's beta1 run, and its drop-view evaluation is 03's too;
    # its DMD2 (4 steps) is no run of 04 (1 step here), so it trains its own
    nb05 = tmp_path / "quick" / "05_method_comparison"
    assert (nb05 / "dmd2" / "student").is_dir()
    assert not any((nb05 / d).exists() for d in ("fastlightgen", "eval_flg", "eval_pruned"))
    methods = pd.read_csv(nb05 / "methods.csv", index_col=0)  # every method timed in the notebook's one process
    assert len(methods) == 4 and methods["sec_per_clip"].gt(0).all()
    assert methods.loc["pruning only", "block_params"] < methods.loc["Euler teacher", "block_params"]
    executed = json.loads((tmp_path / "quick" / "03_stage3_ablations" / "03_stage3_ablations.ipynb").read_text())
    assert executed["metadata"]["papermill"]["parameters"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    # a second run reuses every finished notebook
    assert set(run_notebooks("quick", params=TINY, out=tmp_path).values()) == {"reused"}


def test_best_value_is_the_swept_value_of_the_highest_average(tmp_path):
    import pandas as pd
    from flgcore.report import best_value
    table = pd.DataFrame({"average": [0.9, 0.10, 0.26, 0.01]}, index=["skip, untrained", 0.0, 0.5, 1.0])
    assert best_value(table, "alpha") == 0.5  # the untrained baseline row is not an alpha
    beta1 = pd.DataFrame({"average": [0.70, 0.75, 0.69]}, index=[1.0, 2.0, 3.5])
    beta1.to_csv(tmp_path / "beta1.csv")
    assert best_value(tmp_path / "beta1.csv", "beta1") == 2.0


def test_later_notebooks_start_from_the_best_stage2_variant_of_notebook_02(tmp_path):
    import pandas as pd
    from flgcore.config import FlgError
    from flgcore.report import best_stage2, choose_stage2
    nb02 = tmp_path / "02_stage2_ablations"
    names = ["frozen, alpha 1", "both views every step", "iterative keep set", "2000 steps"]
    diagnosis = pd.DataFrame({"average": [0.71, 0.74, 0.76, 0.80],
                              "eval_run": [str(nb02 / "diagnosis" / n / "eval") for n in names]}, index=names)
    fields = {"frozen, alpha 1": dict(alpha=1.0), "both views every step": dict(alpha=1.0, views="both"),
              "iterative keep set": dict(alpha=1.0, drop=[1, 2]), "2000 steps": dict(alpha=1.0, steps=2000)}
    with pytest.raises(FlgError, match="run notebook 02 first"):
        best_stage2(tmp_path)
    # a longer run or another keep set scores higher, but it is no recipe for notebook 04's every retention
    choice = choose_stage2(diagnosis, fields, nb02 / "diagnosis", nb02)
    assert choice["variant"] == "both views every step" and choice["fields"] == dict(alpha=1.0, views="both")
    assert best_stage2(tmp_path) == choice and choice["model"] == str(nb02 / "diagnosis" / names[1] / "model")
    with pytest.raises(FlgError, match="nothing to choose from"):
        choose_stage2(diagnosis.iloc[2:], fields, nb02 / "diagnosis", nb02)


def test_paired_differences_are_against_the_baseline_row_on_the_same_seeds(tmp_path):
    import numpy as np
    import pandas as pd
    from flgcore import report
    from flgcore.config import FlgError
    a = np.random.default_rng(0).uniform(0.4, 0.6, 16)  # per-seed scores; b = a + 0.05 and c = a - 0.2 on every seed
    for name, shift in (("a", 0.0), ("b", 0.05), ("c", -0.2)):
        (tmp_path / name).mkdir()
        pd.DataFrame({"seed": range(16), "average": a + shift}).to_csv(tmp_path / name / "clips.csv", index=False)
    table = pd.DataFrame({"average": [0.5, 0.55, 0.3, 0.1], "eval_run": [str(tmp_path / n) for n in "abc"] + [None]},
                         index=["a", "b", "c", "untrained"])
    t = report.paired(table, "best")
    assert t.loc["b", "minus_baseline"] == 0 and t.loc["a", "minus_baseline"] == pytest.approx(-0.05)
    assert t.loc["a", "ci95_low"] == pytest.approx(-0.05) and t.loc["a", "ci95_high"] == pytest.approx(-0.05)
    assert t.loc["c", "minus_baseline"] == pytest.approx(-0.25) and np.isnan(t.loc["untrained", "minus_baseline"])
    assert report.paired(table, "a").loc["b", "minus_baseline"] == pytest.approx(0.05)
    with pytest.raises(FlgError, match="baseline 'z' is not a row"):
        report.paired(table, "z")
    fig = report.plot_paired(t, "best", "t")  # the rows that pair, with their numbers written beside the bars
    assert [x.get_text() for x in fig.axes[0].get_yticklabels()] == ["c\n-0.250 [-0.250, -0.250]",
                                                                     "a\n-0.050 [-0.050, -0.050]"]
    # the same figure saved again is the same file: no creation date in the PDF
    first, again = report.save_figure(fig, "f", tmp_path / "1"), report.save_figure(fig, "f", tmp_path / "2")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert b"/CreationDate" not in first[1].read_bytes() and first[1].suffix == ".pdf"


def test_a_narrow_paired_panel_keeps_its_tick_labels_apart():
    import matplotlib.pyplot as plt
    import pandas as pd
    from flgcore import report
    # notebook 05's layout: differences from -0.17 to +0.03 beside a quality-vs-time plot
    t = pd.DataFrame({"minus_baseline": [0.0, 0.022, -0.164, -0.098], "ci95_low": [0.0, 0.017, -0.171, -0.104],
                      "ci95_high": [0.0, 0.027, -0.157, -0.092]}, index=["teacher", "dmd2", "pruned", "flg"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.6), gridspec_kw=dict(wspace=0.6))
    report.plot_paired(t, "teacher", "t", ax=axes[1])
    fig.canvas.draw()
    boxes = [x.get_window_extent() for x in axes[1].get_xticklabels() if x.get_text()]
    assert len(boxes) >= 3 and all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))
    plt.close(fig)


def test_a_sweep_in_parallel_processes_gives_the_same_table(tiny_bundle_dir, tmp_path, monkeypatch):
    import pandas as pd
    from flgcore import report
    # no `threads` here: a run sets torch's thread count for the whole process, and later tests compare
    # in-process runs with subprocess ones bit for bit
    base = dict(model=str(tiny_bundle_dir), drop=[1, 2], steps=2, batch_size=2, warmup=1)
    ev = dict(view="drop", n=2, steps=2)
    serial = report.sweep("stage2", "alpha", [0.5, 1.0], base, tmp_path / "serial", ev)
    # from here on this process may only read finished runs: the work must happen in the spawned ones
    stage = report._stage

    def read_only(name):
        def refuse(cfg):
            raise AssertionError(f"{name} ran in the parent process")
        return stage(name)[0], refuse
    monkeypatch.setattr(report, "_stage", read_only)
    parallel = report.sweep("stage2", "alpha", [0.5, 1.0], base, tmp_path / "parallel", ev, jobs=2)
    pd.testing.assert_frame_equal(serial.drop(columns="eval_run"), parallel.drop(columns="eval_run"))
    assert serial.loc[0.5, "eval_run"] == str(tmp_path / "serial" / "alpha_0.5" / "eval")


def test_a_sweep_reuses_a_finished_run_of_the_same_config(tiny_bundle_dir, tmp_path, monkeypatch):
    from flgcore import report
    base = dict(model=str(tiny_bundle_dir), drop=[1, 2], steps=2, batch_size=2, warmup=1)
    ev = dict(view="drop", n=2, steps=2)
    alphas = report.sweep("stage2", "alpha", [0.5], base, tmp_path, ev)
    stage, trained = report._stage, []

    def counted(name):
        cls, fn = stage(name)
        return cls, lambda cfg: (trained.append((name, cfg.out)), fn(cfg))
    monkeypatch.setattr(report, "_stage", counted)
    modes = report.sweep("stage2", "drop_mode", ["whole_set", "per_block"], dict(base, alpha=0.5), tmp_path, ev,
                         reuse=[tmp_path / "alpha_0.5"])
    assert [n for n, _ in trained] == ["stage2", "eval"]  # per_block only: whole_set is alpha_0.5 again
    assert trained[0][1] == str(tmp_path / "drop_mode_per_block")
    assert modes.loc["whole_set"].equals(alphas.loc[0.5])
    assert report.finished_twin("stage2", dict(base, alpha=1.0), [tmp_path / "alpha_0.5"]) is None


def test_a_finished_run_of_another_stage_is_no_twin(tiny_bundle_dir, tmp_path):
    """A Stage I folder shares model, data, batch_size and seed with a Stage II config: it must not pass for
    a finished Stage II run of it (a notebook would then take Stage I's folder as its Stage-II model)."""
    from flgcore import report
    from flgcore.runs import run_status
    s1 = tmp_path / "stage1"
    report.run("stage1", model=str(tiny_bundle_dir), n=2, batch_size=2, sigmas=[0.5], retention=0.5, out=str(s1))
    s2 = dict(model=str(tiny_bundle_dir), drop=[1, 2], steps=2, batch_size=2, seed=0, out=str(tmp_path / "s2"))
    assert report.finished_twin("stage2", s2, [s1]) is None
    assert run_status(Stage2Config(**dict(s2, out=str(s1))), s1) == "other"
