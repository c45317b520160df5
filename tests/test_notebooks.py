"""The notebooks: parameters named like config fields, thin (no defs), no outputs, and every one runs."""
import dataclasses
import json

import pandas as pd
import pytest
import torch

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
NOTEBOOK_INPUTS = {"out", "figures", "runs_root", "stage1_run", "stage2_model", "skip", "clip_seeds", "jobs", "launcher",
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
    assert not (tmp_path / "quick" / "04_steps_vs_retention" / "stage2_r0.7").exists()  # notebook 02's run, reused
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


def test_later_notebooks_start_from_the_best_alpha_of_notebook_02(tmp_path):
    import pandas as pd
    from flgcore.config import FlgError
    from flgcore.report import best_stage2_model, best_value
    table = pd.DataFrame({"average": [0.9, 0.10, 0.26, 0.01]}, index=["skip, untrained", 0.0, 0.5, 1.0])
    assert best_value(table, "alpha") == 0.5  # the untrained baseline row is not an alpha
    beta1 = pd.DataFrame({"average": [0.70, 0.75, 0.69]}, index=[1.0, 2.0, 3.5])
    beta1.to_csv(tmp_path / "beta1.csv")
    assert best_value(tmp_path / "beta1.csv", "beta1") == 2.0
    nb02 = tmp_path / "02_stage2_ablations"
    nb02.mkdir()
    table.to_csv(nb02 / "alpha.csv")
    assert best_stage2_model(tmp_path) == str(nb02 / "alpha_0.5" / "model")  # the folder report.sweep writes
    (nb02 / "alpha_1").mkdir()  # a sweep over alphas=[0, 1] names its folders without ".0"
    pd.DataFrame({"average": [0.1, 0.3]}, index=[0, 1]).to_csv(nb02 / "alpha.csv")
    assert best_stage2_model(tmp_path) == str(nb02 / "alpha_1" / "model")
    with pytest.raises(FlgError, match="02_stage2_ablations/alpha.csv not found"):
        best_stage2_model(tmp_path / "elsewhere")


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
    pd.testing.assert_frame_equal(serial, parallel)


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
