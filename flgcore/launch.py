"""Where runs execute: in this process (`launcher: local`), or as Slurm jobs through submitit (`launcher: <YAML>`).

`report.run_folder` and `report.sweep` hand their unfinished runs to a launcher as *works*: each a list of
(stage, config fields) run in order in one process (a sweep's Stage-II run, then the evaluation of the model it
made). The local launcher runs them here, or in N processes. The Slurm launcher submits one job per work, all of a
sweep's at once (one job array per set of resources), writes `job.json` into each run folder, shows the jobs' states
and waits for them, or with `wait: false` stops with `Pending` (run the same command again once they are done: what
finished is reused, what is still queued is not submitted twice). A job runs the same `run_<stage>(cfg)` as a local
run, so a preempted job (requeued by submitit's checkpoint) and a cancelled one (submitted again) resume from the
stage's last checkpoint. The plan launcher (`flg notebooks plan`) only records what would run.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from .config import FlgError, from_dict
from .runs import read_json, write_json

Work = list[tuple[str, dict]]  # (stage, config fields) run in order in one process
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD",
          "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}
UNKNOWN_GRACE_S = 300  # a job sacct does not list yet (just submitted) counts as queued for this long
PENDING_EXIT = 3       # `flg notebooks run` exits with this status when runs are pending


class Pending(FlgError):
    """Runs were submitted (or are still queued from an earlier call) and `wait: false` says not to wait for them."""

    def __init__(self, n: int):
        self.n = n
        super().__init__(f"{n} runs pending: run it again when they finish")


PENDING_RE = re.compile(r"(\d+) runs pending: run it again when they finish")


@dataclass
class SlurmLauncher:
    """A Slurm launcher YAML. Resources are per job (one run, or a run and its evaluation): a `zero: true` run gets
    `nodes` x `gpus_per_node` tasks (one process per GPU, torch.distributed from Slurm's environment); any other
    run one task on one node with one GPU (none with gpus_per_node 0: a CPU job)."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time: int = 60                  # minutes per job; one that reaches it is requeued like a preempted one (3 times)
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem_gb: float | None = None     # per node
    setup: list[str] = field(default_factory=list)  # shell lines run before the job (module load, conda activate)
    folder: str = "runs/slurm"      # submitit's job files and the jobs' stdout/stderr logs
    wait: bool = True               # false: submit, then stop with "N runs pending" (run it again later)
    poll: float = 30.0              # seconds between state checks (sacct)
    requeue: bool = True            # requeue a preempted or timed-out job (it resumes from its last checkpoint)


def load_slurm(path: str | Path) -> SlurmLauncher:
    p = Path(path)
    if not p.is_file():
        raise FlgError(f"launcher {str(path)!r}: expected 'local' or a Slurm launcher YAML file (not found)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise FlgError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise FlgError(f"{p}: a launcher file must be a mapping of keys to values")
    try:
        cfg = from_dict(SlurmLauncher, data)
    except FlgError as e:
        raise FlgError(f"{p}: {e}") from None
    rules = {"time": (lambda v: v >= 1, ">= 1 (minutes)"), "nodes": (lambda v: v >= 1, ">= 1"),
             "gpus_per_node": (lambda v: v >= 0, ">= 0"), "cpus_per_task": (lambda v: v is None or v >= 1, ">= 1"),
             "mem_gb": (lambda v: v is None or v > 0, "> 0"), "poll": (lambda v: v > 0, "> 0 (seconds)")}
    for key, (ok, desc) in rules.items():
        if not ok(getattr(cfg, key)):
            raise FlgError(f"{p}: launcher key {key!r} must be {desc}, got {getattr(cfg, key)!r}")
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cfg, key) == "":
            raise FlgError(f"{p}: launcher key {key!r} is empty: leave it out for Slurm's default")
    return cfg


def launcher(spec, jobs: int = 1):
    """The launcher a `launcher` value names: "local" (or None), a Slurm launcher YAML path (or a SlurmLauncher),
    or "plan:<file>" (record only)."""
    if spec is None or spec == "local":
        return Local(jobs)
    if isinstance(spec, SlurmLauncher):
        return Slurm(spec)
    if isinstance(spec, str) and spec.startswith("plan:"):
        return Plan(Path(spec[len("plan:"):]))
    if not isinstance(spec, (str, Path)):
        raise FlgError(f"launcher must be 'local' or a Slurm launcher YAML path, got {spec!r}")
    return Slurm(load_slurm(spec))


def slurm_of(spec) -> SlurmLauncher | None:
    """The Slurm launcher a `launcher` value names, or None (local, plan)."""
    if isinstance(spec, SlurmLauncher):
        return spec
    if spec is None or spec == "local" or isinstance(spec, str) and spec.startswith("plan:"):
        return None
    return load_slurm(spec)


def _config(stage: str, fields: dict):
    from . import report
    return from_dict(report._stage(stage)[0], fields)


def _status(stage: str, fields: dict) -> str:
    from .runs import run_status
    cfg = _config(stage, fields)
    return run_status(cfg, cfg.out)


def _unfinished(work: Work) -> Work:
    """The work from its first unfinished run on (a sweep's run that finished before its evaluation)."""
    for i, (stage, fields) in enumerate(work):
        if _status(stage, fields) != "finished":
            return work[i:]
    return []


# ----------------------------------------------------------------------------- local

def work_size(work: Work) -> int:
    """A work's length in samples passed through a model (training steps x batch, clips x sampling steps), enough to
    order a pool's works longest first: a 4000-step run started last would run alone while the other processes idle."""
    size = 0
    for stage, fields in work:
        cfg = _config(stage, fields)
        if stage == "eval":
            size += (getattr(cfg, "n", None) or 1) * (getattr(cfg, "steps", None) or 1)
        else:
            both = 2 if getattr(cfg, "views", "") == "both" else 1
            size += both * (getattr(cfg, "steps", None) or 1) * (getattr(cfg, "batch_size", None) or 1)
    return size


def _share_threads(threads: int) -> None:
    """A pool process's torch CPU threads: the parent's, shared among the processes (a stage's own `threads` key,
    when set, still wins), so that N processes do not each start one thread per core."""
    import torch
    torch.set_num_threads(threads)


@dataclass
class Local:
    jobs: int = 1  # works at once, in as many spawned processes

    def run(self, works: list[Work]) -> None:
        from . import report
        works = [w for w in works if w]
        if self.jobs > 1 and len(works) > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            import torch
            n = min(self.jobs, len(works))
            works = sorted(works, key=work_size, reverse=True)  # the pool takes them in this order
            with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_share_threads,
                                     initargs=(max(1, torch.get_num_threads() // n),)) as pool:
                list(pool.map(report.run_work, works))
            return
        for w in works:
            report.run_work(w)


# ----------------------------------------------------------------------------- plan (record, run nothing)

@dataclass
class Plan:
    path: Path  # one JSON line per run that would start: stage, its fields, its folder's status

    def run(self, works: list[Work]) -> None:
        works = [u for w in works if (u := _unfinished(w))]
        if not works:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            for w in works:
                for i, (stage, fields) in enumerate(w):
                    # a later run of a work (an evaluation) reads what the first makes: not known yet
                    status = _status(stage, fields) if i == 0 else "after " + w[0][1]["out"]
                    f.write(json.dumps(dict(stage=stage, fields=fields, status=status), default=str) + "\n")
        raise Pending(len(works))


# ----------------------------------------------------------------------------- Slurm

def _distributed(stage: str, fields: dict) -> bool:
    """A ZeRO-3 run: one process per GPU of the job (Stages II-III with zero=true)."""
    return bool(getattr(_config(stage, fields), "zero", False))


def resources(cfg: SlurmLauncher, distributed: bool) -> dict:
    """submitit parameters of one job: a distributed run on every GPU of `nodes` nodes, any other on one GPU."""
    gpus = cfg.gpus_per_node if distributed else min(cfg.gpus_per_node, 1)
    p = dict(timeout_min=cfg.time, nodes=cfg.nodes if distributed else 1, gpus_per_node=gpus,
             tasks_per_node=gpus or 1, slurm_setup=list(cfg.setup))
    p.update({f"slurm_{k}": v for k in ("partition", "account", "qos", "constraint") if (v := getattr(cfg, k))})
    if cfg.cpus_per_task:
        p["cpus_per_task"] = cfg.cpus_per_task
    if cfg.mem_gb:
        p["mem_gb"] = cfg.mem_gb
    if distributed:  # one failed task ends the job, rather than leaving its peers waiting for it until the timeout
        p["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
    return p


def master_port(job_id: str) -> int:
    """The port of a distributed job's rendezvous, the same in all its tasks without a word between them: from the
    job's id, below Linux's ephemeral range (32768-60999), where no outgoing connection of the node can hold it."""
    return 20000 + zlib.crc32(str(job_id).encode()) % 12000


def read_job(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / "job.json"
    return read_json(path) if path.is_file() else None


def _state(info: dict) -> str:
    return (info.get("State") or "UNKNOWN").split()[0]  # "CANCELLED by 0" -> CANCELLED


class StageJob:
    """The function a Slurm job runs: each run of its work, as a local run would (`report.prepare`, then the stage),
    with job.json kept in each run folder. submitit calls `checkpoint` on preemption or timeout: it returns the same
    call, which is requeued and resumes from the stage's last checkpoint."""

    def __init__(self, requeue: bool = True):
        self.requeue = requeue

    def __call__(self, work: Work) -> None:
        import submitit
        from . import report, zero
        env = submitit.JobEnvironment()
        rank = env.global_rank
        for stage, fields in work:
            cfg, distributed = _config(stage, fields), _distributed(stage, fields)
            if distributed:  # torch.distributed from Slurm's tasks, before the stage's own zero.init
                os.environ.setdefault("MASTER_PORT", str(master_port(env.job_id)))  # a `setup` line may choose it
                submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            elif rank != 0:
                continue  # a run on one process: the first task's
            if rank == 0:
                cfg, status = report.prepare(stage, fields)
                if status == "finished":
                    continue
                _write_job(cfg.out, dict(read_job(cfg.out) or {}, job_id=env.job_id, array_index=_array_index(env.job_id),
                                         nodes=",".join(env.hostnames), stdout=str(env.paths.stdout),
                                         stderr=str(env.paths.stderr), state="RUNNING", folder=os.environ.get(
                                             "SUBMITIT_FOLDER", "")))
            report._stage(stage)[1](cfg)
            if distributed:
                zero.shutdown(True)

    def checkpoint(self, work: Work):
        import submitit
        return submitit.helpers.DelayedSubmission(self, work) if self.requeue else None


def _write_job(run_dir, info: dict) -> None:
    write_json(Path(run_dir) / "job.json", {k: v for k, v in info.items() if v is not None})


@dataclass
class Slurm:
    cfg: SlurmLauncher

    def run(self, works: list[Work]) -> None:
        import submitit
        from . import report
        folder = Path(self.cfg.folder).resolve()
        tracked, new = [], []  # (work, job, the run folder whose job.json names the job)
        for work in works:
            if not (rest := _unfinished(work)):
                continue
            # a work whose job is still queued or running is followed, not submitted again; its job.json is in the
            # folder of the work's first run at its submission (a later run of it may not have begun yet)
            for _, fields in work:
                info = read_job(fields["out"])
                job = submitit.SlurmJob(folder=info.get("folder") or folder, job_id=info["job_id"]) if info else None
                if job is not None and self._active(job, info):
                    tracked.append((work, job, fields["out"]))
                    break
            else:
                new.append(rest)
        for w in new:
            report.prepare(*w[0])  # the folder's config.yaml first: job.json alone would make it no run folder
        groups: dict[bool, list[Work]] = {}
        for w in new:
            groups.setdefault(_distributed(*w[0]), []).append(w)
        for distributed, group in groups.items():
            ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
            ex.update_parameters(name=f"flg-{group[0][0][0]}", **resources(self.cfg, distributed))
            with ex.batch():  # one sbatch: an array of the group's works
                jobs = [ex.submit(StageJob(self.cfg.requeue), w) for w in group]
            for w, job in zip(group, jobs):
                _write_job(w[0][1]["out"], dict(job_id=job.job_id, array_index=_array_index(job.job_id),
                                                stdout=str(job.paths.stdout), stderr=str(job.paths.stderr),
                                                submit_time=datetime.now().isoformat(timespec="seconds"), state="PENDING",
                                                folder=str(folder), stage=w[0][0]))
                tracked.append((w, job, w[0][1]["out"]))
        if not tracked:
            return
        if not self.cfg.wait:
            raise Pending(len(tracked))
        self._wait(tracked)

    @staticmethod
    def _active(job, info: dict) -> bool:
        state = _state(job.get_info(mode="force"))
        if state == "UNKNOWN":  # not in sacct (yet): queued if it was submitted a moment ago
            since = datetime.now() - datetime.fromisoformat(info.get("submit_time", "1970-01-01T00:00:00"))
            return since.total_seconds() < UNKNOWN_GRACE_S
        return state in ACTIVE

    def _wait(self, tracked) -> None:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(tracked), desc=f"slurm ({len(tracked)} runs)", unit="run", dynamic_ncols=True)
        live = sys.stderr.isatty() or hasattr(bar, "container")  # a terminal or a notebook widget: redrawn in place
        try:
            while True:
                tracked[0][1].watcher.update()  # one sacct call for every job
                counts: dict[str, int] = {}
                for _, job, home in tracked:
                    slurm = job.get_info("cache")
                    state, nodes = _state(slurm), slurm.get("NodeList", "")
                    counts[state] = counts.get(state, 0) + 1
                    info = read_job(home) or {}
                    if state != "UNKNOWN" and info.get("state") != state or nodes and not info.get("nodes"):
                        _write_job(home, dict(info, state=state, nodes=info.get("nodes") or nodes))
                done = sum(job.done() for _, job, _ in tracked)
                postfix = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                if live or done != bar.n or postfix != bar.postfix:  # a log file: a line per change, not per poll
                    bar.n = done
                    bar.set_postfix_str(postfix)
                if bar.n == len(tracked):
                    break
                time.sleep(self.cfg.poll)
        finally:
            bar.close()
        failed = [f for t in tracked if (f := self._failure(*t))]
        if failed:
            more = f"{len(failed)} of {len(tracked)} Slurm jobs failed; the first: " if len(failed) > 1 else ""
            raise FlgError(more + failed[0])

    @staticmethod
    def _failure(work: Work, job, home) -> str | None:
        """One line for a job that ended without finishing its runs; None if they finished."""
        raised = job.paths.result_pickle.exists() and job.exception() is not None  # its process may still be exiting
        ok = job.paths.result_pickle.exists() and not raised and not _unfinished(work)
        state = "COMPLETED" if ok else "FAILED" if raised else _state(job.get_info("force"))
        for _, fields in work:  # every run folder of the job records how it ended
            if (info := read_job(fields["out"])) and info.get("job_id") == job.job_id:
                _write_job(fields["out"], dict(info, state=state))
        return None if ok else f"{home}: Slurm job {job.job_id} {state}: {error_line(job.paths.stderr)} " \
                               f"(log: {job.paths.stderr})"


def _array_index(job_id: str) -> int | None:
    return int(job_id.split("_")[1]) if "_" in job_id else None


def error_line(stderr: Path) -> str:
    """The line of a job's stderr log that says what went wrong: the last exception line of a traceback, else the last
    line that mentions an error (Slurm's own: time limit, memory), else the last line."""
    try:
        lines = [l.strip() for l in Path(stderr).read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return "no stderr log"
    exc = [l for l in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b(:|$)", l)]
    errs = [l for l in lines if "error" in l.lower() and not l.startswith("submitit")]
    return (exc or errs or lines or ["empty stderr log"])[-1][:300]


# ----------------------------------------------------------------------------- cost estimates (flg notebooks plan)

def stage_of(run_dir: Path) -> str:
    """Which stage made a finished run folder, from what it holds."""
    d = Path(run_dir)
    return ("stage1" if (d / "blocks.csv").is_file() else "eval" if (d / "clips.csv").is_file()
            else "stage3" if (d / "student").exists() else "stage2")


def step_seconds(run_dir: Path) -> float | None:
    """Mean seconds per training step in a run's log.jsonl (None without one)."""
    rows = _log(run_dir)
    return sum(r["sec_per_step"] for r in rows) / len(rows) if rows else None


def _log(run_dir: Path) -> list[dict]:
    log = Path(run_dir) / "log.jsonl"
    if not log.is_file():
        return []
    return [r for r in map(json.loads, log.read_text().splitlines()) if "sec_per_step" in r and "step" in r]


def spent_hours(run_dir: Path) -> float | None:
    """Wall hours a finished run took, from its log (Stages II-III: each line's mean step time x its steps) or
    its metrics (evaluations: seconds per clip x clips); None when neither says."""
    d = Path(run_dir)
    if rows := _log(d):
        steps = [r["step"] for r in rows]
        return sum(r["sec_per_step"] * (s - p) for r, s, p in zip(rows, steps, [0, *steps[:-1]])) / 3600
    metrics = read_json(d / "metrics.json") if (d / "metrics.json").is_file() else {}
    if (clip := metrics.get("sec_per_clip")) is not None and (d / "clips.csv").is_file():
        return clip * (len((d / "clips.csv").read_text().splitlines()) - 1) / 3600
    return None


def measured_rates(run_dirs) -> dict[tuple, float]:
    """Seconds per step (Stages II-III) and per clip (evaluations) of finished runs, keyed by what sets them most on
    one model: (stage, batch_size) and ("eval", steps)."""
    rates: dict[tuple, float] = {}
    for d in map(Path, run_dirs):
        if not (d / "metrics.json").is_file() or not (d / "config.yaml").is_file():
            continue
        cfg = yaml.safe_load((d / "config.yaml").read_text()) or {}
        if (sec := step_seconds(d)) is not None:
            rates[(stage_of(d), cfg.get("batch_size"))] = sec
        elif (clip := read_json(d / "metrics.json").get("sec_per_clip")) is not None:
            rates[("eval", cfg.get("steps"))] = clip
    return rates


def bench_rates(csv: str | Path | None) -> dict[str, float]:
    """Seconds per step or clip from `flg bench --gpu` (bench_gpu.csv): the fastest setting that fit in memory."""
    if not csv:
        return {}
    import pandas as pd
    if not Path(csv).is_file():
        raise FlgError(f"bench results {csv} not found (flg bench --gpu writes <out>/bench_gpu.csv)")
    rows = pd.read_csv(csv)
    rows = rows[~rows["oom"].astype(bool)] if "oom" in rows else rows
    names = {"stage2 step": "stage2", "stage3 student turn + fake update": "stage3", "teacher sampling": "eval"}
    return {names[w]: float(g["sec"].min()) for w, g in rows.groupby("what") if w in names}


def estimate(stage: str, fields: dict, gpus: int, rates: dict, bench: dict) -> tuple[float | None, str]:
    """Wall hours of one run on `gpus` GPUs, and where its time per step came from; (None, "unknown")."""
    cfg = _config(stage, fields)
    if stage in ("stage2", "stage3"):
        sec, source = step_seconds(Path(cfg.out)), "its own log.jsonl"
        if sec is None and (sec := rates.get((stage, cfg.batch_size))) is not None:
            source = "a finished run of the same stage and batch size"
        if sec is None and stage in bench:  # the bench measures one sample per GPU
            sec, source = bench[stage] * -(-cfg.batch_size // max(1, gpus)), "flg bench --gpu (1 sample per GPU)"
        return (sec * cfg.steps / 3600, source) if sec is not None else (None, "unknown")
    if stage == "eval":
        sec, source = rates.get(("eval", cfg.steps)), "a finished evaluation with the same steps"
        if sec is None and "eval" in bench:
            sec, source = bench["eval"] * (cfg.steps or 50) / 50, "flg bench --gpu (teacher sampling, by steps)"
        return (sec * cfg.n / 3600, source) if sec is not None else (None, "unknown")
    return None, "unknown"


def gpus_of(spec, stage: str, fields: dict) -> int:
    """GPUs one run holds under this launcher (0: a CPU run)."""
    slurm = slurm_of(spec)
    if slurm is None:
        return 1 if str(fields.get("device", "cpu")).startswith("cuda") else 0
    p = resources(slurm, _distributed(stage, fields))
    return p["gpus_per_node"] * p["nodes"]
