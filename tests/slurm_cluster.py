"""A real single-node SLURM cluster (munged + slurmctld + slurmd) in a temporary directory.

Settings come from ``/work/shared/notes/slurm-local-cluster.md``. All state, logs, pid files and
the munge key and socket live under one folder; the daemons run in the foreground as children of
the test process and are stopped (TERM, then KILL) at the end, after every job process ended:
a process of the cluster that outlives it (slurmstepd, srun, an entrypoint, a rank) fails the stop. Clients find the cluster through
``SLURM_CONF``, which this helper sets in ``os.environ`` while the cluster runs (sbatch passes it
on into jobs).

Missing Debian packages are installed with ``.ci/slurm_setup.sh`` (idempotent) instead of skipping.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from megadistill.engine.launch import free_port
from megadistill.pipeline.process import describe, matching_pids

REPO = Path(__file__).resolve().parents[1]
SETUP_SCRIPT = REPO / ".ci" / "slurm_setup.sh"
_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "srun", "scancel")
_START_TIMEOUT_S = 60.0

_SLURM_CONF = """\
ClusterName={cluster}
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerParameters=sched_interval=1,bf_interval=1,batch_sched_delay=0,sched_min_interval=0
DependencyParameters=kill_invalid_depend
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmClusterError(RuntimeError):
    """The local test cluster could not be installed, started or queried."""


def _helper(pid: int) -> bool:
    """Whether ``pid`` lives as long as a process that is not a job: slurmctld's own script
    daemon (``slurmscriptd``, stopped with slurmctld), or a helper of this (pytest) process's
    Python runtime, such as the multiprocessing resource tracker that a test's worker pool
    starts. Both inherit ``SLURM_CONF``; waiting for them to end would wait for the timeout."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    if cmd.strip(": ").startswith("slurmscriptd"):
        return True
    parent = int(stat[stat.rindex(")") + 2 :].split()[1])
    return parent == os.getpid() and "from multiprocessing." in cmd


def ensure_installed() -> None:
    """Install the Debian SLURM and munge packages with ``.ci/slurm_setup.sh`` if any is missing."""
    if all(shutil.which(b) for b in _BINARIES):
        return
    proc = subprocess.run(
        ["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=600, check=False
    )
    missing = [b for b in _BINARIES if not shutil.which(b)]
    if proc.returncode != 0 or missing:
        raise SlurmClusterError(
            f"{SETUP_SCRIPT} failed (exit {proc.returncode}; still missing {missing}); run it by "
            f"hand as root to see why:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )


class LocalSlurmCluster:
    """One-node SLURM cluster under ``root``; use as a context manager or call start/stop.

    Args:
        root: folder for config, state, logs and munge files (created; must be empty or absent).
        cpus: CPUs the node advertises (may exceed the hardware: ``config_overrides``).
    """

    def __init__(self, root: str | Path, cpus: int = 16) -> None:
        self.root = Path(root)
        self.cpus = cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge-run" / "munge.socket.2"
        self._procs: dict[str, subprocess.Popen] = {}
        self._old_conf: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> LocalSlurmCluster:
        """Write the config, start munged, slurmctld and slurmd; wait until the node is idle."""
        ensure_installed()
        self._write_files()
        self._old_conf = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.conf)
        try:
            self._spawn("munged", ["munged", "-F", "-f", *self._munge_args()])
            self._wait(lambda: self.munge_socket.exists(), "munged socket")
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-N", self.host, "-f", str(self.conf)])
            self._wait(self._node_idle, "the node to become idle")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel what still runs, then stop the daemons (TERM, then KILL after 10 s).

        Raises:
            SlurmClusterError: a process of this cluster (slurmstepd, srun, a job script, a rank)
                outlived it; it was killed, and the error lists it.
        """
        if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
            self._cancel_all()
            self._wait_jobs_gone(timeout_s=300)  # ends as soon as they are gone
        self._stop_daemons()
        leftovers = self.job_processes()
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if leftovers:
            raise SlurmClusterError(
                f"processes of the test cluster outlived it (killed now): {describe(leftovers)}"
            )

    def job_processes(self) -> list[int]:
        """Live processes this cluster started, other than its daemons: slurmstepd, srun, job
        scripts, ranks (found by the ``SLURM_CONF`` that names this cluster's config)."""
        own = {os.getpid(), *(p.pid for p in self._procs.values())}
        conf = str(self.conf)
        return matching_pids(
            lambda pid, env: env.get("SLURM_CONF") == conf and pid not in own and not _helper(pid)
        )

    def _wait_jobs_gone(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.job_processes() and time.monotonic() < deadline:
            time.sleep(0.5)

    def _stop_daemons(self) -> None:
        for name in reversed(list(self._procs)):
            proc = self._procs.pop(name)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        if self._old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self._old_conf

    def __enter__(self) -> LocalSlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ queries
    def scontrol(self, *args: str, timeout_s: float = 20.0) -> str:
        """Run ``scontrol`` against this cluster and return stdout (raises on failure)."""
        proc = subprocess.run(
            ["scontrol", *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, "SLURM_CONF": str(self.conf)},
            check=False,
        )
        if proc.returncode != 0:
            raise SlurmClusterError(f"scontrol {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def job_states(self, job_id: str) -> list[str]:
        """``JobState`` of every record of ``job_id`` (one per array task)."""
        text = self.scontrol("show", "job", "-o", job_id)
        return re.findall(r"\bJobState=(\S+)", text)

    def log_tail(self, n: int = 40) -> str:
        """The last lines of the daemons' logs, for failure messages."""
        out = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / "log" / name
            if path.is_file():
                out.append(f"--- {name} ---\n" + "\n".join(path.read_text().splitlines()[-n:]))
        return "\n".join(out)

    # ------------------------------------------------------------------ internals
    def _cancel_all(self) -> None:
        """Cancel every job of this private cluster so no job process outlives it."""
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            user = pwd.getpwuid(os.getuid()).pw_name
            subprocess.run(["scancel", "--full", f"--user={user}"], env=env, timeout=10,
                           capture_output=True, check=False)  # fmt: skip
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                out = subprocess.run(["squeue", "-h"], env=env, timeout=10, capture_output=True,
                                     text=True, check=False)  # fmt: skip
                if out.returncode != 0 or not out.stdout.strip():
                    return
                time.sleep(0.5)

    def _munge_args(self) -> list[str]:
        m = self.root / "munge"
        return [
            f"--socket={self.munge_socket}",
            f"--key-file={m / 'munge.key'}",
            f"--pid-file={m / 'munged.pid'}",
            f"--seed-file={m / 'munged.seed'}",
            f"--log-file={self.root / 'log' / 'munged.log'}",
        ]

    def _write_files(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        for sub in ("state", "spool", "run", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        # munge insists on a private key folder and a world-searchable socket folder.
        (self.root / "munge").mkdir(mode=0o700, exist_ok=True)
        self.munge_socket.parent.mkdir(mode=0o755, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
        self.conf.write_text(
            _SLURM_CONF.format(
                cluster=f"md{os.getpid()}",
                host=self.host,
                ctld_port=free_port(),
                slurmd_port=free_port(),
                munge_socket=self.munge_socket,
                root=self.root,
                cpus=self.cpus,
                mem_mb=max(1024, mem_mb // 2),
            )
        )

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")  # noqa: SIM115 - owned by Popen
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()

    def _node_idle(self) -> bool:
        with contextlib.suppress(SlurmClusterError, subprocess.TimeoutExpired):
            text = self.scontrol("show", "node", self.host, "-o", timeout_s=5)
            state = re.search(r"\bState=(\S+)", text)
            return bool(state and state.group(1).startswith("IDLE"))
        return False

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            dead = [n for n, p in self._procs.items() if p.poll() is not None]
            if dead:
                raise SlurmClusterError(
                    f"{dead[0]} exited while waiting for {what}:\n" + self.log_tail()
                )
            if ready():
                return
            time.sleep(0.2)
        raise SlurmClusterError(
            f"timed out after {_START_TIMEOUT_S:.0f} s waiting for {what}:\n" + self.log_tail()
        )


@contextlib.contextmanager
def local_slurm_cluster(cpus: int = 16) -> Iterator[LocalSlurmCluster]:
    """Start a cluster in a fresh temp dir, yield it, stop it and remove the dir."""
    root = Path(tempfile.mkdtemp(prefix="md-slurm-"))
    cluster = LocalSlurmCluster(root, cpus=cpus)
    try:
        with cluster:
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)
