"""Runs sent to a real Slurm (one node on this machine, tests/slurm_cluster.py) through the launcher: each run a job,
the same results as a local run, a sweep submitted at once, a cancelled job resumed bit for bit, a preempted one
requeued, a failure reported in one line, `wait: false`, and notebook 02 with every run a Slurm job."""
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import slurm_cluster
from flgcore import report
from flgcore.config import FlgError
from flgcore.launch import Pending, read_job

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="session")
def slurm():
    """A one-node Slurm (munge, MariaDB, slurmdbd, slurmctld, slurmd) for the session; $SLURM_CONF points at it."""
    if (reason := slurm_cluster.install()) is not None:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="flg-slurm-"))
    t0 = time.time()
    cluster = slurm_cluster.start(root)
    print(f"slurm cluster up in {time.time() - t0:.1f} s")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        shutil.rmtree(root, ignore_errors=True)


def launcher_yaml(path: Path, **extra) -> str:
    """A launcher for the test cluster: one CPU per job (two jobs at once on a 2-core node), polled every second."""
    keys = dict(partition="debug", time=30, cpus_per_task=1, poll=1, folder=str(path.parent / "slurm"), **extra)
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()))
    return str(path)


# threads of every run here, local or on Slurm, so that they compute alike; 1 by default: two jobs share the 2-core
# node, and a second thread on a busy core slowed a Stage-II step ~50x
THREADS = int(os.environ.get("FLG_TEST_THREADS", 1))


@pytest.fixture(autouse=True)
def same_threads_after():
    """A local run sets torch's threads for the whole process: give later tests the session's value back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def stage2_fields(model, **kw) -> dict:
    return dict(dict(model=str(model), drop=[1, 2], steps=2, batch_size=2, warmup=1, threads=THREADS), **kw)


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file
    files = sorted((run_dir / "model").rglob("*.safetensors"))
    assert files
    return {f"{f.relative_to(run_dir)}:{k}": v for f in files for k, v in load_file(f).items()}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])][:3]


def sacct_state(cluster, job_id: str) -> str:
    out = cluster.run("sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", job_id.split("_")[0])
    states = dict(line.split("|") for line in out.splitlines() if line)
    return states.get(job_id, "").split(" ")[0]


def wait_until(what, timeout: float = 120, every: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        if got := what():
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s")


def test_a_stage2_run_as_a_slurm_job_matches_the_local_run(slurm, tiny_bundle_dir, tmp_path):
    fields = stage2_fields(tiny_bundle_dir)
    local = report.run("stage2", out=str(tmp_path / "local"), **fields)
    on_slurm = report.run("stage2", launcher=launcher_yaml(tmp_path / "slurm.yaml"), out=str(tmp_path / "job"), **fields)
    assert on_slurm == local
    assert_same_weights(tmp_path / "local", tmp_path / "job")
    job = read_job(tmp_path / "job")
    assert job["state"] == "COMPLETED" and job["nodes"] == "localhost" and job["stage"] == "stage2"
    wait_until(lambda: sacct_state(slurm, job["job_id"]) == "COMPLETED", 30)  # its process may still be exiting
    assert Path(job["stdout"]).is_file() and Path(job["stderr"]).is_file()
    assert "job_id" in job and "submit_time" in job
    # finished: asked again, nothing is submitted
    assert report.run("stage2", launcher=launcher_yaml(tmp_path / "slurm.yaml"), out=str(tmp_path / "job"), **fields) == local
    assert read_job(tmp_path / "job")["job_id"] == job["job_id"]


def test_a_sweep_is_one_job_array_and_gives_the_local_table(slurm, tiny_bundle_dir, tmp_path):
    base, ev = stage2_fields(tiny_bundle_dir), dict(view="drop", n=2, steps=2, threads=THREADS)
    local = report.sweep("stage2", "alpha", [0.5, 1.0], base, tmp_path / "local", ev)
    on_slurm = report.sweep("stage2", "alpha", [0.5, 1.0], base, tmp_path / "slurm", ev,
                            launcher=launcher_yaml(tmp_path / "slurm.yaml"))
    # the same scores; each row's `eval_run` names its own folder
    pd.testing.assert_frame_equal(local.drop(columns="eval_run"), on_slurm.drop(columns="eval_run"))
    jobs = [read_job(tmp_path / "slurm" / f"alpha_{a}") for a in (0.5, 1.0)]
    assert {j["job_id"].split("_")[0] for j in jobs} == {jobs[0]["job_id"].split("_")[0]}  # one sbatch
    assert sorted(j["array_index"] for j in jobs) == [0, 1]
    for a, j in zip((0.5, 1.0), jobs):  # the evaluation ran in the same job
        assert read_job(tmp_path / "slurm" / f"alpha_{a}" / "eval")["job_id"] == j["job_id"]


def test_wait_false_reports_pending_and_never_submits_a_queued_run_twice(slurm, tiny_bundle_dir, tmp_path):
    base, ev = stage2_fields(tiny_bundle_dir), dict(view="drop", n=2, steps=2, threads=THREADS)
    later = launcher_yaml(tmp_path / "later.yaml", wait=False)
    with pytest.raises(Pending, match=r"^2 runs pending: run it again when they finish$"):
        report.sweep("stage2", "alpha", [0.5, 1.0], base, tmp_path / "s", ev, launcher=later)
    first = [read_job(tmp_path / "s" / f"alpha_{a}")["job_id"] for a in (0.5, 1.0)]
    with pytest.raises(Pending, match=r"^2 runs pending"):  # still queued or running: followed, not resubmitted
        report.sweep("stage2", "alpha", [0.5, 1.0], base, tmp_path / "s", ev, launcher=later)
    assert [read_job(tmp_path / "s" / f"alpha_{a}")["job_id"] for a in (0.5, 1.0)] == first
    table = report.sweep("stage2", "alpha", [0.5, 1.0], base, tmp_path / "s", ev,
                         launcher=launcher_yaml(tmp_path / "wait.yaml"))
    assert list(table.index) == [0.5, 1.0]
    assert [read_job(tmp_path / "s" / f"alpha_{a}")["job_id"] for a in (0.5, 1.0)] == first
    n_jobs = len(slurm.run("sacct", "-n", "-X", "-P", "-o", "JobID", "-j", first[0].split("_")[0]).split())
    assert n_jobs == 2


LONG = dict(steps=300, ckpt_every=10, log_every=10)  # 10-20 s at 1 thread: long enough to be stopped between checkpoints


@pytest.fixture(scope="module")
def uninterrupted(tiny_bundle_dir, tmp_path_factory):
    out, n = tmp_path_factory.mktemp("uninterrupted"), torch.get_num_threads()
    report.run("stage2", out=str(out), **stage2_fields(tiny_bundle_dir, **LONG))
    torch.set_num_threads(n)
    return out


def _first_checkpoint(out: Path):
    return wait_until(lambda: next((out / "checkpoints").glob("step_*"), None) if (out / "checkpoints").is_dir() else None)


def _job_processes(folder: str) -> list[str]:
    """The processes of jobs submitted with this submitit folder (they carry it on their command line)."""
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in ps if "submitit.core._submit" in line and folder in line]


def test_a_cancelled_job_resumes_when_submitted_again_bit_for_bit(slurm, tiny_bundle_dir, uninterrupted, tmp_path):
    fields, out = stage2_fields(tiny_bundle_dir, **LONG), tmp_path / "run"
    with pytest.raises(Pending):
        report.run("stage2", launcher=launcher_yaml(tmp_path / "later.yaml", wait=False), out=str(out), **fields)
    _first_checkpoint(out)
    job = read_job(out)["job_id"]
    slurm.run("scancel", job)
    wait_until(lambda: sacct_state(slurm, job) == "CANCELLED")
    # the job's process ignores SIGTERM (submitit keeps it for preemption) and is killed KillWait seconds later
    wait_until(lambda: not _job_processes(read_job(out)["folder"]), 60)
    assert not (out / "metrics.json").exists()
    report.run("stage2", launcher=launcher_yaml(tmp_path / "wait.yaml"), out=str(out), **fields)
    again = read_job(out)
    assert again["job_id"] != job and again["state"] == "COMPLETED"
    assert "resuming" in Path(again["stdout"]).read_text()
    assert_same_weights(uninterrupted, out)


def test_a_preempted_job_is_requeued_and_resumes_bit_for_bit(slurm, tiny_bundle_dir, uninterrupted, tmp_path):
    import submitit
    fields, out = stage2_fields(tiny_bundle_dir, **LONG), tmp_path / "run"
    with pytest.raises(Pending):
        report.run("stage2", launcher=launcher_yaml(tmp_path / "later.yaml", wait=False), out=str(out), **fields)
    _first_checkpoint(out)
    info = read_job(out)
    submitit.SlurmJob(folder=info["folder"], job_id=info["job_id"])._interrupt()  # what a preemption sends
    # Slurm holds a requeued job for two minutes (its BeginTime): release it at once
    squeue = lambda: slurm.run("squeue", "-h", "-j", info["job_id"], "-o", "%T %r").strip()  # noqa: E731
    wait_until(lambda: squeue() == "PENDING BeginTime", 60)
    slurm.run("scontrol", "update", f"JobId={info['job_id']}", "StartTime=now")
    report.run("stage2", launcher=launcher_yaml(tmp_path / "wait.yaml"), out=str(out), **fields)
    assert read_job(out)["job_id"] == info["job_id"]  # the same job, requeued by itself: not submitted again
    log = Path(info["stdout"]).read_text() + Path(info["stderr"]).read_text()
    assert "Requeued job" in log and "resuming" in log
    assert_same_weights(uninterrupted, out)


def test_a_failed_job_is_one_line_with_its_job_id_error_and_log(slurm, tiny_bundle_dir, tmp_path):
    fields = dict(stage2_fields(tiny_bundle_dir), drop=[99])  # accepted here, refused by the stage on the node
    with pytest.raises(FlgError) as e:
        report.run("stage2", launcher=launcher_yaml(tmp_path / "slurm.yaml"), out=str(tmp_path / "bad"), **fields)
    job = read_job(tmp_path / "bad")
    msg = str(e.value)
    assert "\n" not in msg and f"Slurm job {job['job_id']} FAILED" in msg and job["stderr"] in msg
    assert "99" in msg and "FlgError" in msg  # the stage's own error line, from the log
    assert job["state"] == "FAILED"


@pytest.mark.slow  # ~4 min on 2 cores: the ablations and the Stage II diagnosis variants, local and on Slurm
def test_notebook_02_with_the_slurm_launcher_gives_the_local_tables(slurm, tiny_bundle_dir, tmp_path, monkeypatch):
    from flgcore import cli
    from flgcore.notebooks import run_label, run_notebooks
    monkeypatch.setenv("OMP_NUM_THREADS", str(THREADS))  # the kernel's runs and the jobs': the same threads
    stage1 = tmp_path / "stage1"
    report.run("stage1", model=str(tiny_bundle_dir), out=str(stage1), n=2, batch_size=2, sigmas=[0.5], threads=THREADS)
    params = dict(model=str(tiny_bundle_dir), steps=2, batch_size=2, eval_n=2, eval_steps=2, alphas=[1.0],
                  drop_modes=["whole_set", "per_block"], retentions=[0.7], stage1_run=str(stage1))
    only = "02_stage2_ablations"
    t0 = time.time()
    assert run_notebooks("quick", [only], params, tmp_path / "local") == {only: "ok"}
    print(f"local notebook: {time.time() - t0:.1f} s")
    t0 = time.time()
    args = ["notebooks", "run", "--profile", "quick", "--only", only, "--out", str(tmp_path / "slurm"),
            "-p", f"launcher={launcher_yaml(tmp_path / 'slurm.yaml')}"] + [f"-p{k}={json.dumps(v)}" for k, v in params.items()]
    assert cli.main(args) == 0
    print(f"slurm notebook: {time.time() - t0:.1f} s")
    label = run_label("quick", params["model"])
    nb_local, nb_slurm = (tmp_path / d / label / only for d in ("local", "slurm"))
    tables = [t for t in ("alpha.csv", "drop_mode.csv", "retention.csv", "diagnosis.csv") if (nb_local / t).is_file()]
    assert len(tables) >= 3
    for table in tables:
        pd.testing.assert_frame_equal(*(pd.read_csv(nb / table).drop(columns="eval_run") for nb in (nb_local, nb_slurm)))
    runs = report.run_folders(tmp_path / "slurm" / label, [only])
    # the untrained view's evaluation, then alpha 1 and drop mode per_block: each a run and its evaluation
    assert len(runs) >= 5 and all((d / "job.json").is_file() for d in runs), [d for d in runs if not (d / "job.json").is_file()]
    assert {read_job(d)["state"] for d in runs} == {"COMPLETED"}


def test_a_zero_run_is_one_job_with_a_process_per_gpu(slurm, tiny_bundle_dir, tmp_path):
    pytest.importorskip("deepspeed")
    from flgcore.models import load_transformer
    fields = dict(stage2_fields(tiny_bundle_dir), steps=3, batch_size=4, log_every=1)
    report.run("stage2", out=str(tmp_path / "one"), **fields)
    # the node's two (fake) GPUs: two tasks, torch.distributed set up from Slurm's environment, gloo on the CPU
    yaml = launcher_yaml(tmp_path / "slurm.yaml", gpus_per_node=2)
    report.run("stage2", launcher=yaml, out=str(tmp_path / "two"), **dict(fields, zero=True))
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
              for d in ("one", "two")]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-6)
    one, two = (load_transformer(tmp_path / d / "model" / "transformer").state_dict() for d in ("one", "two"))
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-3, atol=1e-4, msg=k)
    job = read_job(tmp_path / "two")
    assert "(2 processes)" not in Path(job["stdout"]).read_text()  # a fresh run: nothing resumed
    wait_until(lambda: sacct_state(slurm, job["job_id"]) == "COMPLETED", 60)  # both processes exited cleanly
    tasks = sorted(Path(job["folder"]).glob(f"{job['job_id']}_*_result.pkl"))
    assert len(tasks) == 2  # one result per task: both ranks ran the stage


def test_a_zero_job_whose_rendezvous_fails_ends_at_once(slurm, tiny_bundle_dir, tmp_path):
    """The first task cannot listen on the job's port: the job fails with that error in a minute or two, rather than
    its second task waiting for the first one until the job's time limit."""
    pytest.importorskip("deepspeed")
    import socket
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        yaml = launcher_yaml(tmp_path / "slurm.yaml", gpus_per_node=2, setup=[f"export MASTER_PORT={port}"])
        start = time.monotonic()
        with pytest.raises(FlgError, match="address already in use"):
            report.run("stage2", launcher=yaml, out=str(tmp_path / "two"),
                       **dict(stage2_fields(tiny_bundle_dir), steps=3, batch_size=4, zero=True))
    assert time.monotonic() - start < 240
    assert read_job(tmp_path / "two")["state"] == "FAILED"


def test_notebook_03_on_a_real_pipeline_with_the_slurm_launcher_gives_the_local_tables(slurm, tmp_path, monkeypatch):
    """Notebook 03 on a tiny Wan 2.1 I2V pipeline from its latent cache: every Stage III run and every evaluation
    (through the stock pipeline) a Slurm job, and the same tables as the local launcher."""
    from tiny_pipelines import write_tiny_world
    from flgcore import cli
    from flgcore.notebooks import run_label, run_notebooks
    monkeypatch.setenv("OMP_NUM_THREADS", str(THREADS))
    pipe, cache = write_tiny_world(tmp_path / "world")
    s2 = report.run_folder("stage2", model=str(pipe), data=str(cache), drop=[1], steps=2, batch_size=2, warmup=1,
                           threads=THREADS, out=str(tmp_path / "stage2"))
    params = dict(model=str(pipe), data=str(cache), stage2_model=str(s2 / "model"), steps=2, batch_size=2, eval_n=2,
                  eval_steps=2, beta1s=[2.0], beta2s=[0.0])
    only = "03_stage3_ablations"
    assert run_notebooks("quick", [only], params, tmp_path / "local") == {only: "ok"}
    args = ["notebooks", "run", "--profile", "quick", "--only", only, "--out", str(tmp_path / "slurm"),
            "-p", f"launcher={launcher_yaml(tmp_path / 'slurm.yaml')}"] + [f"-p{k}={json.dumps(v)}" for k, v in params.items()]
    assert cli.main(args) == 0
    label = run_label("quick", str(pipe))
    nb_local, nb_slurm = (tmp_path / d / label / only for d in ("local", "slurm"))
    for table in ("beta1.csv", "beta2.csv", "teacher_and_stage3.csv"):
        local = pd.read_csv(nb_local / table)
        assert local.scored_by.str.startswith("weight-free").all()
        pd.testing.assert_frame_equal(local.drop(columns="eval_run"), pd.read_csv(nb_slurm / table).drop(columns="eval_run"))
    runs = report.run_folders(tmp_path / "slurm" / label, [only])
    # beta1 2.0, beta2 0.0 and the unpruned teacher: each a run and its evaluation; the Stage-II-only evaluation
    assert len(runs) == 7 and all((d / "job.json").is_file() for d in runs), [d for d in runs if not (d / "job.json").is_file()]
    assert {read_job(d)["state"] for d in runs} == {"COMPLETED"}
    assert all(read_job(d)["job_id"] for d in runs)
