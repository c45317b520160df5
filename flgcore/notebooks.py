"""`flg notebooks run`: execute the analysis notebooks with papermill, in dependency order.

Each notebook runs into `runs/notebooks/<profile>/<name>/` (the executed .ipynb beside the tables and
figures it writes). A notebook whose executed copy finished with the same parameters is reused; a
failing one is reported at the end (with its error) and the others still run; the exit status is
non-zero if any failed. Profiles: `quick` (a 2-core CPU, minutes) and `full` (the testbed at the size
that reproduces the paper's trends; a GPU is recommended).

`-p launcher=<Slurm launcher YAML>` sends every run to Slurm (`launch.py`); with `wait: false` a notebook whose
runs were submitted stops as "pending: N runs" and the later ones (which read its runs) wait for it.
`plan_notebooks` (`flg notebooks plan`) executes them with a launcher that only records what would run.
"""
from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from .config import FlgError

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"

# in dependency order: later notebooks read the runs earlier ones made
ORDER = ["01_block_importance", "02_stage2_ablations", "03_stage3_ablations", "04_steps_vs_retention",
         "05_method_comparison"]

# per-profile parameters; the notebooks' own parameters cells hold the quick values
PROFILES: dict[str, dict[str, dict]] = {
    "quick": {name: {} for name in ORDER},
    "full": {
        "01_block_importance": dict(n=64, sigmas=[0.1, 0.3, 0.5, 0.7, 0.9], retentions=[0.9, 0.8, 0.7, 0.6, 0.5],
                                    clip_steps=50),
        "02_stage2_ablations": dict(steps=400, batch_size=16, eval_n=256, eval_steps=50, alphas=[0.0, 0.5, 1.0],
                                    retentions=[0.8, 0.7, 0.6], val_n=64, lengths=[2000, 4000], lrs=[6e-4, 5e-5, 2e-5]),
        # Stage III at configs/stage3_synth_tiny.yaml's length and batch (~9 min per run on 2 CPU threads); the
        # Stage-II-only row sampled as the teacher is (the paper's Table 6 used 28 steps)
        "03_stage3_ablations": dict(steps=300, batch_size=12, eval_n=256, eval_steps=50, beta1s=[1.0, 2.0, 3.5],
                                    beta2s=[0.0, 0.25, 1.0]),
        # Stage II as in 02 and Stage III as in 03, so that their runs of the same config are reused
        "04_steps_vs_retention": dict(steps=400, batch_size=16, stage3_steps=300, stage3_batch_size=12, eval_n=256,
                                      student_steps=[1, 2, 4], retentions=[1.0, 0.8, 0.7, 0.6]),
        # the teacher and pruning-only rows sampled as the paper's teacher (50 Euler steps + CFG); its Stage-III
        # runs are those of 03 (FastLightGen) and 04 (DMD2 at 4 steps), reused
        "05_method_comparison": dict(steps=300, batch_size=12, eval_n=256, eval_steps=50, bench_n=16, bench_repeats=5),
    },
}


# A real checkpoint's runs take the family's recipe (configs/real/<family>/, read by report.recipe: None keeps the
# recipe's value) for what the notebooks' defaults set to the testbed's recipe, in every profile; in the full profile
# also its lengths and batch sizes, and the evaluations score the whole suite; the sweeps stay
REAL_RECIPE = dict(lr=None, fake_lr=None, fake_updates=None, stage3_lr=None, stage3_fake_lr=None,
                   stage3_fake_updates=None)
REAL_FULL_SIZES = dict(steps=None, batch_size=None, eval_n=None, eval_steps=None, val_n=None, stage3_steps=None,
                       stage3_batch_size=None, lengths=[], lrs=[], bench_n=4, bench_repeats=2)


def profile_parameters(profile: str, name: str, real: bool) -> dict:
    """A notebook's parameters in a profile: the quick profile is its own parameters cell; the full one the testbed
    at full size (`PROFILES`). On a real checkpoint `REAL_RECIPE` goes over either, and in the full profile
    `REAL_FULL_SIZES` too (Stage I keeps its full size)."""
    p = dict(PROFILES[profile].get(name, {}))
    if real and name != ORDER[0]:
        p.update(REAL_RECIPE, **(REAL_FULL_SIZES if profile == "full" else {}))
    return p


def repo_root(start: Path | None = None) -> Path:
    """The repository a notebook belongs to: the nearest folder at or above `start` (the working directory) holding
    notebooks/ and pyproject.toml (a copy of the repo is its own), else the one this package was installed from;
    with neither (an installed package run elsewhere), `start` itself."""
    here = Path(start or Path.cwd()).resolve()
    return next((p for p in (here, *here.parents) if (p / "notebooks").is_dir() and (p / "pyproject.toml").is_file()),
                NOTEBOOK_DIR.parent if NOTEBOOK_DIR.is_dir() else here)


def at_repo_root() -> Path:
    """Make `repo_root()` the working directory, so that a notebook's relative paths (runs/, figures/) are the
    repo's whichever folder its kernel starts in (JupyterLab starts it in notebooks/, and wrote runs there)."""
    import os
    root = repo_root()
    os.chdir(root)
    return root


# parameters that name files or folders (made absolute by `run_notebooks` when the notebooks' folder is not here)
PATH_PARAMETERS = ("model", "data", "stage1_run", "stage2_model", "launcher", "suite", "recipe", "vbench_python")
RUNTIME_PARAMETERS = ("launcher",)  # how the runs execute, not what they compute: a change does not redo a notebook


def parameters_of(path: Path) -> dict:
    import papermill as pm
    return {k: v["default"] for k, v in pm.inspect_notebook(str(path)).items()}


def check_parameters(params: dict, names: list[str]) -> None:
    """Refuse a -p name that none of these notebooks' parameters cells has (papermill would only warn) and a
    value of another type than the notebook's default (an int for a float is fine; a None default takes any)."""
    import ast
    defaults: dict = {}
    for name in names:
        for k, text in parameters_of(NOTEBOOK_DIR / f"{name}.ipynb").items():
            try:
                defaults.setdefault(k, ast.literal_eval(text))
            except (ValueError, SyntaxError):
                defaults.setdefault(k, None)
    for k, v in params.items():
        if k not in defaults:
            raise FlgError(f"parameter {k!r} is not in the parameters cell of {', '.join(names)}; "
                           f"they take: {', '.join(sorted(defaults))}")
        d = defaults[k]
        if d is not None and v is not None and not (type(v) is type(d) or type(d) is float and type(v) is int):
            raise FlgError(f"parameter {k}={v!r}: expected type {type(d).__name__} (the notebook's default is {d!r})")


def _inputs(params: dict) -> dict:
    """Content prints of the models a notebook starts from, as a run folder records them (`runs.run_inputs`)."""
    from .runs import run_inputs
    return run_inputs(params)


def _code(nb: dict) -> list[str]:
    """A notebook's code cells as text, without the cell papermill injects for the parameters."""
    return ["".join(c["source"]) for c in nb["cells"]
            if c["cell_type"] == "code" and "injected-parameters" not in c.get("metadata", {}).get("tags", [])]


def _done(executed: Path, params: dict, src: Path) -> bool:
    """An executed copy that ran to the end with these parameters, these input weights and the notebook's
    current code (an edited notebook runs again; the finished runs inside its sweeps are still reused)."""
    sidecar = executed.with_name("inputs.json")
    if not (executed.is_file() and sidecar.is_file()) or json.loads(sidecar.read_text()) != _inputs(params):
        return False
    nb = json.loads(executed.read_text())
    pm = nb.get("metadata", {}).get("papermill", {})
    same = lambda p: {k: v for k, v in (p or {}).items() if k not in RUNTIME_PARAMETERS}  # noqa: E731
    return (same(pm.get("parameters")) == same(params) and bool(pm.get("end_time")) and not pm.get("exception")
            and _code(nb) == _code(json.loads(src.read_text())))


def testbed_model(model: str) -> bool:
    """synth-tiny or a flgcore model with a SynthMotion text encoder: one SynthBench can score."""
    from .sampling import model_root
    try:
        return (model_root(model) / "text_encoder").is_dir()
    except FlgError:
        return False


def run_label(profile: str, model: str | None) -> str:
    """The folder under `out` a profile runs into: the profile's name for the shipped teacher, else with the
    model's name appended, so that another model's runs never replace the teacher's (a run folder made with
    other inputs is redone) and its figures stay in its run folders, out of the committed figures/."""
    if not model or model == "synth-tiny":
        return profile
    import re
    return f"{profile}-{re.sub(r'[^A-Za-z0-9._-]+', '_', Path(model).name or 'model')}"


def run_notebooks(profile: str = "quick", only: list[str] | None = None, params: dict | None = None,
                  out: str | Path = "runs/notebooks", force: bool = False, executed_to: Path | None = None) -> dict[str, str]:
    """Execute the notebooks; returns {name: "ok" | "reused" | "skipped: why" | "pending: N runs" | "waits for X" |
    error line}. `executed_to`: write the executed copies there instead of beside their runs (a plan)."""
    import papermill as pm
    from .launch import PENDING_RE, slurm_of
    if profile not in PROFILES:
        raise FlgError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    names = ORDER if not only else only
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        raise FlgError(f"unknown notebook(s) {unknown}; known: {ORDER}")
    model = (params or {}).get("model")
    real = model is not None and not testbed_model(str(model))
    if real and (params or {}).get("data", "synth") == "synth":
        raise FlgError(f"model={model} is a real checkpoint: give -p data=<its latent cache> (flg cache); its students "
                       f"are scored on -p suite=<prompts>, by default the cache's own clips")
    check_parameters(params or {}, names)
    label = run_label(profile, model)
    import torch
    params = dict(params or {})
    figures = Path("figures")
    if repo_root() != Path.cwd().resolve():  # the notebooks work from the repo root (`at_repo_root`), not from here:
        for k in PATH_PARAMETERS:  # paths relative to here would not resolve there
            v = params.get(k)
            prefix = "cache:" if k == "suite" and isinstance(v, str) and v.startswith("cache:") else ""
            if isinstance(v, str) and v and Path(v[len(prefix):]).exists():
                params[k] = prefix + str(Path(v[len(prefix):]).resolve())
        out, figures = Path(out).resolve(), figures.resolve()
    slurm = slurm_of(params.get("launcher"))  # a bad launcher file is refused before anything runs
    # every stage and eval runs there: here, or on the Slurm jobs' nodes
    gpu = slurm.gpus_per_node > 0 if slurm is not None else torch.cuda.is_available()
    params.setdefault("device", "cuda" if gpu else "cpu")
    # a sweep's runs at once: the tiny testbed model leaves most of a GPU idle; on a CPU they would only
    # compete for the same cores; a real checkpoint fills a GPU alone
    params.setdefault("jobs", 4 if params["device"].startswith("cuda") and not real else 1)
    status: dict[str, str] = {}
    waiting = None  # the first notebook whose runs are pending: the later ones read them
    for name in tqdm(names, desc=f"notebooks ({label}, {params['device']})", dynamic_ncols=True):
        if waiting:
            status[name] = f"waits for {waiting}"
            continue
        src = NOTEBOOK_DIR / f"{name}.ipynb"
        run_dir = Path(out) / label / name
        defaults = parameters_of(src)
        p = dict(profile_parameters(profile, name, real), **params)
        p = {k: v for k, v in p.items() if k in defaults}  # -p applies to the notebooks that have the name
        # only the shipped teacher's full profile regenerates the committed figures/
        p.update(out=str(run_dir), figures=str(figures) if label == "full" else str(run_dir / "figures"),
                 runs_root=str(Path(out) / label))
        executed = run_dir / f"{name}.ipynb"
        if not force and _done(executed, p, src):
            status[name] = "reused"
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        if executed_to is not None:
            executed = Path(executed_to) / f"{name}.ipynb"
        try:
            pm.execute_notebook(str(src), str(executed), parameters=p, kernel_name="python3", progress_bar=False,
                                cwd=str(Path.cwd()))
            if executed_to is None:
                (run_dir / "inputs.json").write_text(json.dumps(_inputs(p)))
            status[name] = "ok"
        except Exception as e:  # noqa: BLE001 - any notebook failure is reported, the rest still run
            if getattr(e, "ename", "") == "Pending" and (m := PENDING_RE.search(str(getattr(e, "evalue", "")))):
                status[name], waiting = f"pending: {m.group(1)} runs", name
                continue
            line = str(e).strip().splitlines()
            status[name] = "FAILED: " + (next((l for l in reversed(line) if l.strip()), type(e).__name__))[:300]
    return status


def plan_notebooks(profile: str = "quick", only: list[str] | None = None, params: dict | None = None,
                   out: str | Path = "runs/notebooks", bench: str | Path | None = None, force: bool = False):
    """What `run_notebooks` would start, without starting it: (notebook status, a table of runs). Each notebook is
    executed with a launcher that records the runs it asks for and stops it there, so a notebook's later cells, and
    the later notebooks, which need those runs' results, are not reached: their runs are not listed (their status
    says so). Finished runs under each notebook's folder are listed too. GPU-hours per run come from measured step
    times: the run's own log.jsonl (a resumed run), a finished run of the same stage and batch size (an evaluation:
    of the same steps), else `bench` (`flg bench --gpu`'s bench_gpu.csv), else "unknown"; `hours` is wall time,
    `gpu_hours` that times the GPUs the launcher gives the run."""
    import tempfile
    import pandas as pd
    from . import launch
    from .report import run_folders
    params = dict(params or {})
    spec = params.get("launcher", "local")
    if (slurm := launch.slurm_of(spec)) is not None:  # the device the runs would get on the Slurm jobs
        params.setdefault("device", "cuda" if slurm.gpus_per_node > 0 else "cpu")
    bench_rows = launch.bench_rates(bench)
    label = run_label(profile, params.get("model"))
    with tempfile.TemporaryDirectory(prefix="flg-plan-") as tmp:
        record = Path(tmp) / "runs.jsonl"
        status = run_notebooks(profile, only, dict(params, launcher=f"plan:{record}"), out, force, executed_to=Path(tmp))
        planned = [json.loads(l) for l in record.read_text().splitlines()] if record.is_file() else []
    root = Path(out).resolve() if repo_root() != Path.cwd().resolve() else Path(out)
    finished = run_folders(root / label, list(status))
    rates = launch.measured_rates(finished)
    rows = []
    for d in finished:
        if (d / "metrics.json").is_file():
            hours = launch.spent_hours(d)
            rows.append(dict(notebook=_notebook_of(d, root / label), stage=launch.stage_of(d), out=_short(d, root / label),
                             status="finished", hours=hours, estimate="measured" if hours is not None else "unknown"))
    for r in planned:
        stage, fields = r["stage"], r["fields"]
        gpus = launch.gpus_of(spec, stage, fields)
        hours, source = launch.estimate(stage, fields, gpus, rates, bench_rows)
        state = r["status"].replace(str(root / label) + "/", "")  # "after <the run it follows>"
        rows.append(dict(notebook=_notebook_of(Path(fields["out"]), root / label), stage=stage,
                         out=_short(Path(fields["out"]), root / label), status=state, hours=hours, gpus=gpus,
                         gpu_hours=None if hours is None else hours * gpus, estimate=source))
    table = pd.DataFrame(rows, columns=["notebook", "stage", "out", "status", "hours", "gpus", "gpu_hours", "estimate"])
    return status, table


def _short(run_dir: Path, root: Path) -> str:
    """A run folder relative to the profile's folder (where the notebooks' runs are), else as it is."""
    try:
        return str(Path(run_dir).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(run_dir)


def _notebook_of(run_dir: Path, root: Path) -> str:
    try:
        return Path(run_dir).resolve().relative_to(Path(root).resolve()).parts[0]
    except ValueError:
        return "?"
