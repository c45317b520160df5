"""A one-node Slurm cluster on this machine, for the launcher's tests: munge, MariaDB, slurmdbd, slurmctld and slurmd
started directly (no systemd), every file of theirs under one folder, stopped by PID.

The node has the machine's CPUs and two fake GPUs (gres on /dev/tty10-11: Slurm sets CUDA_VISIBLE_DEVICES, nothing
runs on them). Accounting is real (slurmdbd over MariaDB), since submitit reads job states with `sacct`.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client", "slurmdbd", "mariadb-server"]
BINARIES = ["munged", "munge", "slurmctld", "slurmd", "sbatch", "sacct", "sacctmgr", "slurmdbd", "mariadbd",
            "mariadb-install-db", "mariadb"]
HINT = ("slurm tests need Debian's " + " ".join(PACKAGES) + ": run them as root with apt-get, or install those packages")
CLUSTER = "flgtest"
MUNGE_SOCKET = "/run/munge/munge.socket.2"


def missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def install() -> str | None:
    """Install the packages with apt-get when we are root and they are missing; None, or why the tests must skip."""
    if missing() and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                       "--no-install-recommends " + " ".join(PACKAGES), shell=True, capture_output=True)
    if missing():
        return HINT
    if os.geteuid() != 0:
        return "slurm tests start slurmd and munged: run them as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    root: Path
    conf: Path
    env: dict[str, str]
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def run(self, *cmd: str, check: bool = True) -> str:
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout

    def start(self, name: str, cmd: list[str], **kw) -> None:
        log = open(self.root / f"{name}.out", "w")
        self.procs.append((name, subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, **kw)))

    def wait_for(self, what: str, ok, timeout: float = 60) -> None:
        end = time.time() + timeout
        while time.time() < end:
            for name, p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited ({p.returncode}): {self.log_tail(name)}")
            if ok():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}: {self.log_tail(self.procs[-1][0])}")

    def log_tail(self, name: str) -> str:
        text = "".join((self.root / f).read_text()[-800:] for f in (f"{name}.out", f"{name}.log")
                       if (self.root / f).is_file())
        return " | ".join(text.strip().splitlines()[-6:])

    def stop(self) -> None:
        """Cancel every job (so that no slurmstepd outlives its slurmd), then stop the daemons in reverse order."""
        if any(n == "slurmctld" and p.poll() is None for n, p in self.procs):
            try:
                jobs = self.run("squeue", "-h", "-o", "%i", check=False).split()
                if jobs:
                    self.run("scancel", *jobs, check=False)
                    end = time.time() + 20
                    while time.time() < end and self.run("squeue", "-h", "-o", "%i", check=False).strip():
                        time.sleep(0.5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        for _name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        self.procs.clear()


def start(root: Path) -> Cluster:
    """Start the daemons with their state under `root`; returns once the node is idle. On a failure, whatever
    was started is stopped before the error propagates."""
    root = Path(root)
    root.chmod(0o755)  # munged runs as munge: it must reach its folder below
    for d in ("munge", "db", "state", "spool", "logs"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.chown(root / "munge", "munge", "munge")
    (root / "munge").chmod(0o700)
    conf = root / "slurm.conf"
    cluster = Cluster(root, conf, dict(os.environ, SLURM_CONF=str(conf)))
    try:
        _start(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _start(c: Cluster) -> None:
    root = c.root
    db_port, dbd_port, ctld_port, slurmd_port = (_free_port() for _ in range(4))
    # munged on its default socket (Slurm's clients reach it there whatever AuthInfo says); one already running
    # there is used, and left running
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
        Path(MUNGE_SOCKET).parent.mkdir(parents=True, exist_ok=True)
        shutil.chown(Path(MUNGE_SOCKET).parent, "munge", "munge")
        c.start("munged", ["munged", "-F", f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/munge/munged.log",
                           f"--seed-file={root}/munge/munged.seed"], user="munge", group="munge")

    # MariaDB in its own data folder, on a TCP port of its own: the accounting database and its user
    subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={root}/db", "--user=root",
                    "--auth-root-authentication-method=normal", "--skip-test-db"],
                   check=True, capture_output=True, env=c.env)
    db_sock = root / "mariadb.sock"
    c.start("mariadb", ["mariadbd", "--no-defaults", f"--datadir={root}/db", f"--socket={db_sock}", f"--port={db_port}",
                        "--bind-address=127.0.0.1", "--user=root", f"--pid-file={root}/mariadb.pid",
                        "--skip-log-bin", "--innodb-buffer-pool-size=32M", "--innodb-flush-log-at-trx-commit=0",
                        "--innodb-doublewrite=0", "--performance-schema=off", "--skip-name-resolve"])
    sql = ["mariadb", "--no-defaults", f"--socket={db_sock}", "-uroot"]
    c.wait_for("mariadb", lambda: subprocess.run([*sql, "-e", "select 1"], capture_output=True).returncode == 0)
    subprocess.run([*sql, "-e", "CREATE DATABASE slurm_acct_db; CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';"
                    " GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"], check=True, capture_output=True)

    auth = "AuthType=auth/munge\n"
    dbd = root / "slurmdbd.conf"  # slurmdbd reads it from the folder of $SLURM_CONF
    dbd.write_text(f"{auth}DbdHost=localhost\nDbdPort={dbd_port}\nSlurmUser=root\nPidFile={root}/slurmdbd.pid\n"
                   f"LogFile={root}/slurmdbd.log\nStorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\n"
                   f"StoragePort={db_port}\nStorageUser=slurm\nStoragePass=slurm\nStorageLoc=slurm_acct_db\n")
    dbd.chmod(0o600)
    hw = dict(kv.split("=", 1) for kv in subprocess.run(["slurmd", "-C"], capture_output=True, text=True)
              .stdout.split("\n")[0].split())
    mem = max(500, int(hw.get("RealMemory", 2000)) // 2)
    c.conf.write_text(f"""ClusterName={CLUSTER}
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
{auth}StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={dbd_port}
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
KillWait=2
MinJobAge=300
SchedulerParameters=sched_interval=1
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={hw.get("CPUs", os.cpu_count())} \
Boards={hw.get("Boards", 1)} SocketsPerBoard={hw.get("SocketsPerBoard", 1)} CoresPerSocket={hw.get("CoresPerSocket", 1)} \
ThreadsPerCore={hw.get("ThreadsPerCore", 1)} RealMemory={mem} Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
    (root / "gres.conf").write_text("NodeName=localhost Name=gpu File=/dev/tty[10-11]\n")

    c.wait_for("munged", lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0)
    c.start("slurmdbd", ["slurmdbd", "-D"])
    c.wait_for("slurmdbd", lambda: subprocess.run(["sacctmgr", "-n", "list", "cluster"], env=c.env,
                                                  capture_output=True).returncode == 0)
    c.run("sacctmgr", "-i", "add", "cluster", CLUSTER)
    c.start("slurmctld", ["slurmctld", "-D", "-f", str(c.conf)])
    c.start("slurmd", ["slurmd", "-D", "-f", str(c.conf), "-N", "localhost"])
    c.wait_for("the node to be idle", lambda: c.run("sinfo", "-h", "-N", "-o", "%T", check=False).strip() == "idle")
