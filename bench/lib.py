"""Shared helpers of the benchmark suite: statistics, process memory, machine
info, sandbox devices, the private Docker engine and crun/runc bundles.

Nothing here asserts anything: it measures and returns numbers (or the
reason a number could not be measured).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.device import HOSTOS, SandboxDevice, app  # noqa: E402

DEMO_BUILD = REPO / "examples" / "demo" / "build"
APP_TREE = DEMO_BUILD / "hello"
HOSTOS_TREE = DEMO_BUILD / "hostos"
# An app that idles until SIGTERM (same as tests/test_update.py's IDLE).
IDLE = "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"
# First instruction of a probe app: write the wall clock (microseconds) to a
# volume. busybox `date` has no %N; `adjtimex` prints time.tv_sec/tv_usec.
STAMP = "adjtimex > /data/stamp; "


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- statistics -------------------------------------------------------------------------


@dataclass
class Stat:
    """Median, quartiles and range of repeated measurements."""

    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def quartiles(self) -> tuple[float, float]:
        if self.n < 4:
            return min(self.values), max(self.values)
        q = statistics.quantiles(self.values, n=4, method="inclusive")
        return q[0], q[2]

    def to_dict(self) -> dict[str, Any]:
        if not self.values:
            return {"n": 0}
        q1, q3 = self.quartiles()
        return {
            "n": self.n,
            "median": self.median,
            "min": min(self.values),
            "max": max(self.values),
            "q1": q1,
            "q3": q3,
            "values": self.values,
        }


def stat(values: Sequence[float]) -> dict[str, Any]:
    return Stat([float(v) for v in values]).to_dict()


# -- processes and memory ---------------------------------------------------------------


def smaps(pid: int) -> dict[str, int]:
    """RSS, PSS and USS (private clean+dirty) of one process, in bytes."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[key.strip()] = int(parts[0]) * 1024
    return {
        "rss": fields.get("Rss", 0),
        "pss": fields.get("Pss", 0),
        "uss": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
        "pss_anon": fields.get("Pss_Anon", 0),
        "pss_file": fields.get("Pss_File", 0),
    }


def smaps_sum(pids: Sequence[int]) -> dict[str, int]:
    total = {"rss": 0, "pss": 0, "uss": 0, "pss_anon": 0, "pss_file": 0, "count": 0}
    for pid in pids:
        with contextlib.suppress(OSError):
            for k, v in smaps(pid).items():
                total[k] += v
            total["count"] += 1
    return total


def proc_table() -> list[tuple[int, int, str]]:
    """(pid, ppid, comm) of every process."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat_line[stat_line.index("(") + 1 : stat_line.rindex(")")]
        ppid = int(stat_line[stat_line.rindex(")") + 2 :].split()[1])
        out.append((int(entry.name), ppid, comm))
    return out


def children(pid: int, comm: str | None = None) -> list[int]:
    return [p for p, pp, c in proc_table() if pp == pid and (comm is None or c == comm)]


def pgrep(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def activity(pids: Sequence[int], seconds: float) -> dict[str, float]:
    """CPU seconds and context switches (all threads) of idle processes over a window."""

    def sample() -> tuple[float, int]:
        cpu, switches = 0.0, 0
        tick = os.sysconf("SC_CLK_TCK")
        for pid in pids:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu += (int(fields[11]) + int(fields[12])) / tick
                for task in Path(f"/proc/{pid}/task").iterdir():
                    with contextlib.suppress(OSError):
                        for line in (task / "status").read_text().splitlines():
                            if line.endswith("ctxt_switches:") or "ctxt_switches:" in line:
                                switches += int(line.split()[-1])
        return cpu, switches

    cpu0, sw0 = sample()
    time.sleep(seconds)
    cpu1, sw1 = sample()
    return {"cpu_percent": 100 * (cpu1 - cpu0) / seconds, "wakeups_per_s": (sw1 - sw0) / seconds}


def run(argv: Sequence[str], check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if check and result.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


def version(argv: Sequence[str], pattern: str = r"(\d+\.\d+[\w.+~-]*)") -> str:
    try:
        out = run(argv, check=False).stdout
    except OSError:
        return "not installed"
    m = re.search(pattern, out)
    return m.group(1) if m else out.strip().splitlines()[0] if out.strip() else "unknown"


def machine_info(docker_bin: str | None) -> dict[str, str]:
    mem = next(
        line
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    info = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu} ({os.cpu_count()} CPUs, nproc {len(os.sched_getaffinity(0))})",
        "memory": f"{int(mem.split()[1]) // 1024} MiB",
        "kernel": platform.release(),
        "os": next(
            (
                line.split("=", 1)[1].strip('"')
                for line in Path("/etc/os-release").read_text().splitlines()
                if line.startswith("PRETTY_NAME=")
            ),
            "?",
        ),
        "python": platform.python_version(),
        "crun": version(["crun", "--version"]),
        "runc": version(["runc", "--version"]),
        "pvpy": run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"], check=False
        ).stdout.strip()
        or "?",
        "cgroups": "hybrid v1+v2"
        if Path("/sys/fs/cgroup/unified").is_mount()
        else "v2"
        if Path("/sys/fs/cgroup/cgroup.controllers").exists()
        else "v1",
    }
    if docker_bin:
        info["docker (CLI)"] = version([docker_bin, "--version"])
    if shutil.which("dockerd"):
        info["dockerd"] = version(["dockerd", "--version"])
        info["containerd"] = version(["containerd", "--version"], r"containerd \S+ v?(\S+)")
    return info


# -- pvpy sandbox devices ---------------------------------------------------------------


def parse_ts(value: str) -> float:
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()


def read_stamp(path: Path) -> float | None:
    """The wall clock an app wrote with busybox `adjtimex`."""
    try:
        text = path.read_text()
    except OSError:
        return None
    sec = re.search(r"time\.tv_sec:\s*(\d+)", text)
    usec = re.search(r"time\.tv_usec:\s*(\d+)", text)
    if not (sec and usec):
        return None
    return int(sec.group(1)) + int(usec.group(1)) / 1e6


class Device(SandboxDevice):
    """tests/device.py's sandbox device, started as a user would (info logs, no faults)."""

    def start(self, *extra: str, env: dict[str, str] | None = None) -> Device:
        env = {k: v for k, v in os.environ.items() if k not in ("PVPY_TEST_FAULTS",)} | (env or {})
        env.setdefault("PVPY_LOG_LEVEL", "info")
        with open(self.log_path, "ab") as out:
            self.started_at = time.time()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pvpy", "device", "run", "--storage", str(self.storage),
                 *extra], stdout=out, stderr=out, env=env)  # fmt: skip
        return self

    def timeline(self) -> list[tuple[float, dict[str, Any]]]:
        return [(parse_ts(e["timestamp"]), e) for e in self.events() if "timestamp" in e]

    def last_event(self, pred: Any) -> float | None:
        found = [t for t, e in self.timeline() if pred(e)]
        return found[-1] if found else None

    def first_event(self, pred: Any, after: float = 0.0) -> float | None:
        found = [t for t, e in self.timeline() if t >= after and pred(e)]
        return found[0] if found else None

    def crun_monitors(self) -> list[int]:
        """The `crun run` processes PID 1 keeps per container (its children)."""
        return children(self.pid1(), "crun")


def container_event(name: str, status: str) -> Any:
    return lambda e: (
        e.get("event") == "container" and e.get("name") == name and (e.get("status") == status)
    )


@contextlib.contextmanager
def device(
    storage: Path, log_path: Path, *extra: str, env: dict[str, str] | None = None
) -> Iterator[Device]:
    """Boot a provisioned storage; always power-cut and clean up afterwards."""
    dev = Device(storage, log_path)
    try:
        yield dev.start(*extra, env=env)
    finally:
        if dev.proc is not None:
            dev.kill()
        else:
            dev.cleanup()


def probe_app(script: str = IDLE, **extra: Any) -> dict[str, Any]:
    """An app that stamps its start time into its permanent volume, then idles."""
    return app(
        STAMP + script,
        volumes=[{"name": "data", "target": "/data", "persistence": "permanent"}],
        **extra,
    )


def hostos() -> dict[str, Any]:
    return dict(HOSTOS)


# -- Docker (a private engine) ----------------------------------------------------------


class DockerEngine:
    """dockerd + containerd of Debian's docker.io with a private data root.

    Run under `docker-init -s` (tini as a subreaper) so the containerd-shim
    processes that daemonize are reaped by us, not left to the host's init.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sock = root / "docker.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cli = (
            "/usr/bin/docker"
            if Path("/usr/bin/docker").exists()
            else (shutil.which("docker") or "docker")
        )
        self.cgroup_parent = f"pvbench-docker-{os.getpid()}"
        self.error: str | None = None

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": f"unix://{self.sock}"}

    def docker(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return run([self.cli, *args], check=check, env=self.env(), timeout=timeout)

    def start(self) -> bool:
        if shutil.which("dockerd") is None:
            self.error = "dockerd not installed (apt-get install docker.io failed?)"
            return False
        self.root.mkdir(parents=True, exist_ok=True)
        init = shutil.which("docker-init")
        argv = [
            "dockerd", "--data-root", str(self.root / "data"),
            "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "dockerd.pid"),
            "-H", f"unix://{self.sock}", "--iptables=false", "--ip-forward=false",
            "--ip-masq=false", "--bridge=none", "--exec-opt", "native.cgroupdriver=cgroupfs",
            "--cgroup-parent", self.cgroup_parent, "--containerd-namespace", "pvbench",
            "--containerd-plugins-namespace", "pvbench-plugins",
        ]  # fmt: skip
        if init:
            argv = [init, "-s", "--", *argv]
        with open(self.root / "dockerd.log", "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.root / "dockerd.log").read_text(errors="replace")[-600:]
                self.error = f"dockerd exited ({self.proc.returncode}): {tail.strip()}"
                return False
            if self.sock.exists() and self.docker("info", check=False).returncode == 0:
                return True
            time.sleep(0.2)
        self.error = "dockerd did not answer within 60 s"
        self.stop()
        return False

    def pids(self) -> dict[str, list[int]]:
        table = proc_table()
        by_comm: dict[str, list[int]] = {"dockerd": [], "containerd": [], "containerd-shim": []}
        for pid, _, comm in table:
            if comm in by_comm:
                with contextlib.suppress(OSError):
                    if str(self.root) in Path(f"/proc/{pid}/cmdline").read_text() or (
                        comm == "containerd-shim" and self._ours(pid)
                    ):
                        by_comm[comm].append(pid)
        return by_comm

    def _ours(self, pid: int) -> bool:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        return b"-namespace pvbench" in cmdline

    def image(self, name: str, tree: Path) -> None:
        tar = subprocess.Popen(["tar", "-C", str(tree), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            [self.cli, "import", "-", name],
            stdin=tar.stdout,
            env=self.env(),
            check=True,
            capture_output=True,
        )
        tar.wait()

    def remove_all(self) -> None:
        ids = self.docker("ps", "-aq", check=False).stdout.split()
        if ids:
            self.docker("rm", "-f", *ids, check=False, timeout=300)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            self.remove_all()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # tini forwards it to dockerd
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        # Anything of ours still mounted (overlay2 layers, netns) goes now.
        mounts = [
            line.split()[1]
            for line in Path("/proc/mounts").read_text().splitlines()
            if str(self.root) in line.split()[1]
        ]
        for mnt in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        for top in Path("/sys/fs/cgroup").glob(f"*/{self.cgroup_parent}"):
            for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
        shutil.rmtree(self.root, ignore_errors=True)


# -- crun / runc bundles ----------------------------------------------------------------


def make_bundle(where: Path, tree: Path) -> Path:
    """An OCI bundle (from `crun spec`) whose rootfs is a copy of ``tree``."""
    if where.exists():
        shutil.rmtree(where)
    where.mkdir(parents=True)
    shutil.copytree(tree, where / "rootfs", symlinks=True)
    run(["crun", "spec"], cwd=where)
    config = json.loads((where / "config.json").read_text())
    config["process"]["terminal"] = False
    config["process"]["args"] = ["/bin/true"]
    config["root"]["readonly"] = False
    config["hostname"] = "bench"
    (where / "config.json").write_text(json.dumps(config, indent=1))
    return where
