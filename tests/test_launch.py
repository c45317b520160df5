"""The launcher without a cluster: the Slurm launcher YAML read strictly, a job's resources, the error line of a log,
the plan launcher (records, starts nothing), `flg notebooks plan` and `flg notebooks run`'s exit status for pending."""
import json
import re

import pytest

from flgcore import launch, report
from flgcore.config import FlgError
from flgcore.launch import Pending, SlurmLauncher, load_slurm


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_a_launcher_yaml_is_read_strictly(tmp_path):
    cfg = load_slurm(write(tmp_path / "ok.yaml", "partition: h100\naccount: proj\ngpus_per_node: 8\ntime: 240\n"
                                                  "setup: [module load cuda, conda activate flgcore]\nwait: false\n"))
    assert cfg == SlurmLauncher(partition="h100", account="proj", gpus_per_node=8, time=240,
                                setup=["module load cuda", "conda activate flgcore"], wait=False)
    bad = {"partiton: h100\n": "unknown config key 'partiton'", "time: 0\n": "'time' must be >= 1 (minutes), got 0",
           "gpus_per_node: eight\n": "'gpus_per_node' must be int, got 'eight'", "poll: -1\n": "'poll' must be > 0",
           "wait: maybe\n": "'wait' must be bool", "qos: ''\n": "'qos' is empty", "- a\n": "must be a mapping",
           "setup: module load cuda\n": "'setup' must be a list"}
    for text, message in bad.items():
        with pytest.raises(FlgError, match=re.escape(message)) as e:
            load_slurm(write(tmp_path / "bad.yaml", text))
        assert "\n" not in str(e.value) and str(tmp_path / "bad.yaml") in str(e.value)
    with pytest.raises(FlgError, match=r"launcher 'nowhere.yaml': expected 'local' or a Slurm launcher YAML file"):
        launch.launcher("nowhere.yaml")
    assert isinstance(launch.launcher("local"), launch.Local) and launch.slurm_of("local") is None


def test_a_job_asks_for_all_gpus_only_for_a_distributed_run():
    cfg = SlurmLauncher(partition="h100", qos="high", nodes=2, gpus_per_node=8, cpus_per_task=12, mem_gb=500,
                        setup=["module load cuda"])
    zero = launch.resources(cfg, distributed=True)
    assert zero == dict(timeout_min=60, nodes=2, gpus_per_node=8, tasks_per_node=8, slurm_setup=["module load cuda"],
                        slurm_partition="h100", slurm_qos="high", cpus_per_task=12, mem_gb=500,
                        slurm_srun_args=["--kill-on-bad-exit=1"])
    one = launch.resources(cfg, distributed=False)
    assert (one["nodes"], one["gpus_per_node"], one["tasks_per_node"]) == (1, 1, 1)
    assert launch.resources(SlurmLauncher(), False)["gpus_per_node"] == 0  # a CPU job
    assert "slurm_account" not in one  # Slurm's default, not an empty --account


def test_a_jobs_rendezvous_port_is_its_own_and_outside_the_ephemeral_range():
    ports = [launch.master_port(j) for j in ("10", "11", "12_0", "12_1", "987654")]
    assert ports == [launch.master_port(j) for j in ("10", "11", "12_0", "12_1", "987654")]  # every task agrees
    low = 32768  # the start of Linux's default ip_local_port_range (to 60999), where outgoing connections take ports
    assert all(1024 <= p < low for p in ports) and len(set(ports)) == len(ports)
    assert "slurm_srun_args" not in launch.resources(SlurmLauncher(), distributed=False)


def test_the_error_line_of_a_job_log(tmp_path):
    log = tmp_path / "1_0_log.err"
    log.write_text("submitit INFO - Starting\nstage2:  50%|#####| 1/2\nTraceback (most recent call last):\n"
                   '  File "x.py", line 1\nflgcore.config.FlgError: dropped block index 99 out of range\n'
                   "submitit ERROR (2026) - Submitted job triggered an exception\n")
    assert launch.error_line(log) == "flgcore.config.FlgError: dropped block index 99 out of range"
    log.write_text("stage2: 10%\nslurmstepd: error: *** JOB 7 ON n1 CANCELLED AT 2026-12-01 DUE TO TIME LIMIT ***\n")
    assert "DUE TO TIME LIMIT" in launch.error_line(log)
    assert launch.error_line(tmp_path / "missing.err") == "no stderr log"
    assert str(Pending(3)) == "3 runs pending: run it again when they finish" and isinstance(Pending(3), FlgError)


def test_the_plan_launcher_records_the_runs_and_starts_nothing(tiny_bundle_dir, tmp_path):
    base = dict(model=str(tiny_bundle_dir), drop=[1, 2], steps=2, batch_size=2, warmup=1)
    record = tmp_path / "plan.jsonl"
    with pytest.raises(Pending, match="^2 runs pending"):
        report.sweep("stage2", "alpha", [0.5, 1.0], base, tmp_path / "s", dict(n=2, steps=2), launcher=f"plan:{record}")
    assert not (tmp_path / "s").exists()
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(r["stage"], r["status"]) for r in rows] == [
        ("stage2", "new"), ("eval", f"after {tmp_path}/s/alpha_0.5"), ("stage2", "new"), ("eval", f"after {tmp_path}/s/alpha_1.0")]


def test_estimates_come_from_measured_step_times(tmp_path):
    run = tmp_path / "done"
    run.mkdir()
    (run / "config.yaml").write_text("model: m\nbatch_size: 4\nsteps: 20\n")
    (run / "metrics.json").write_text("{}")
    (run / "log.jsonl").write_text("".join(json.dumps(dict(step=s, sec_per_step=2.0)) + "\n" for s in (10, 20)))
    assert launch.spent_hours(run) == pytest.approx(40 / 3600)
    rates = launch.measured_rates([run])
    fields = dict(model="synth-tiny", out=str(tmp_path / "new"), steps=3600, batch_size=4)
    assert launch.estimate("stage2", fields, 1, rates, {}) == (pytest.approx(2.0), "a finished run of the same stage and batch size")
    bench = tmp_path / "bench_gpu.csv"
    bench.write_text("what,sec,oom\nstage2 step,1.5,False\nstage2 step,0.5,True\nteacher sampling,60,False\n")
    rows = launch.bench_rates(bench)
    assert rows == {"stage2": 1.5, "eval": 60.0}  # the fastest setting that fit in memory
    hours, source = launch.estimate("stage2", dict(fields, batch_size=16), 8, {}, rows)
    assert hours == pytest.approx(3600 * 1.5 * 2 / 3600) and source.startswith("flg bench")
    assert launch.estimate("stage2", dict(fields, batch_size=16), 8, {}, {}) == (None, "unknown")
    assert launch.gpus_of(SlurmLauncher(gpus_per_node=8, nodes=2), "stage2", dict(fields, zero=True)) == 16
    assert launch.gpus_of(SlurmLauncher(gpus_per_node=8, nodes=2), "eval", dict(model="synth-tiny")) == 1


def test_flg_notebooks_plan_lists_what_would_run_and_starts_nothing(tiny_bundle_dir, tmp_path, capsys):
    from flgcore import cli
    stage1 = tmp_path / "stage1"
    report.run("stage1", model=str(tiny_bundle_dir), out=str(stage1), n=2, batch_size=2, sigmas=[0.5])
    slurm = write(tmp_path / "slurm.yaml", "partition: h100\ngpus_per_node: 8\n")
    args = ["notebooks", "plan", "--only", "02_stage2_ablations", "--only", "03_stage3_ablations", "--out",
            str(tmp_path / "nb"), "-p", f"model={tiny_bundle_dir}", "-p", f"stage1_run={stage1}", "-p", "eval_n=2",
            "-p", f"launcher={slurm}"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "02_stage2_ablations  pending: 1 runs" in out  # its first run, the untrained view's evaluation
    assert "03_stage3_ablations  waits for 02_stage2_ablations" in out
    assert "untrained_drop_view" in out and "1 runs to start" in out
    assert not list((tmp_path / "nb").rglob("config.yaml"))  # nothing ran
    assert not list((tmp_path / "nb").rglob("*.ipynb"))  # and no executed copy stands in for a real one


def test_flg_notebooks_run_exits_3_when_runs_are_pending(monkeypatch, capsys):
    from flgcore import cli, notebooks
    monkeypatch.setattr(notebooks, "run_notebooks", lambda *a, **k: {"01_block_importance": "ok",
                                                                      "02_stage2_ablations": "pending: 2 runs",
                                                                      "03_stage3_ablations": "waits for 02_stage2_ablations"})
    with pytest.raises(SystemExit) as e:
        cli.main(["notebooks", "run"])
    assert e.value.code == launch.PENDING_EXIT == 3
    assert "02_stage2_ablations: runs pending on Slurm" in capsys.readouterr().err


def test_a_local_pool_takes_the_longest_works_first_and_shares_the_threads(tiny_bundle_dir, tmp_path, monkeypatch):
    import concurrent.futures

    import torch
    seen = {}

    class Pool:  # records what the launcher asks of the pool; runs nothing
        def __init__(self, n, mp_context=None, initializer=None, initargs=()):
            seen.update(n=n, initializer=initializer, initargs=initargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, fn, works):
            seen["order"] = [w[0][1]["out"] for w in works]
            return []
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Pool)
    s2 = dict(model=str(tiny_bundle_dir), drop=[1, 2], batch_size=2)
    ev = dict(model=str(tiny_bundle_dir), n=4, steps=2)
    works = [[("stage2", dict(s2, steps=400, out="short"))], [("eval", dict(ev, out="eval"))],
             [("stage2", dict(s2, steps=4000, out="long"))], [("stage2", dict(s2, steps=400, views="both", out="both"))]]
    launch.Local(jobs=2).run(works)
    assert seen["order"] == ["long", "both", "short", "eval"]
    assert seen["n"] == 2 and seen["initargs"] == (max(1, torch.get_num_threads() // 2),)
    assert launch.work_size(works[0] + works[1]) == 400 * 2 + 4 * 2


def test_a_run_another_process_is_working_on_is_waited_for(tiny_bundle_dir, tmp_path):
    import subprocess
    import sys
    import time

    from flgcore.runs import run_lock
    out = tmp_path / "s2"
    work = [("stage2", dict(model=str(tiny_bundle_dir), drop=[1, 2], steps=2, batch_size=2, warmup=1, out=str(out)))]
    code = f"from flgcore import report; report.run_work({work!r})"
    with run_lock(out):  # as if another process were training into the folder
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        line = p.stdout.readline()  # the first thing it prints: it waits, and has written nothing
        assert "another process is working on it; waiting" in line and not out.exists()
        time.sleep(1)
        assert p.poll() is None and not out.exists()
    assert p.wait(timeout=120) == 0
    assert (out / "metrics.json").is_file()
