"""Test helpers: build revisions from small specs and boot them in the sandbox.

A ``SandboxDevice`` is a real ``pvpy device run`` process (PID 1 in its own
namespaces, real crun). It is always taken down at the end: Ctrl-C first,
then SIGKILL of the launcher, which the kernel turns into SIGKILL of PID 1
and so of the whole pid namespace; crun's leftover cgroups are deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pvpy import control
from pvpy.errors import DeviceError
from pvpy.paths import sandbox_run_dir

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "examples" / "demo"
BUSYBOX_TREE = DEMO / "build" / "hello"  # busybox + /usr/bin/hello


def need_root_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces, mounts and crun")
    for tool in ("crun", "mksquashfs", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (tools/setup installs it)")
    if not Path("/bin/busybox").exists():
        pytest.skip("busybox-static not installed (tools/setup installs it)")


def pvpy(*args: Any, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "pvpy", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"pvpy {args} failed ({result.returncode}): {result.stderr}")
    return result


# an app that idles and stops on SIGTERM (as PID 1 of its namespace it must trap it)
IDLE = "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"
# updates in tests: commit after 1 s of goals held, give up after 8 s
COMMIT = ("--commit-delay", "1", "--commit-timeout", "8")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


HOSTOS = {
    "role": "host-os",
    "rootfs": {"dir": str(DEMO / "build" / "hostos"), "all_root": True},
    "args": ["/sbin/init"],
}


def app(script: str, **extra: Any) -> dict[str, Any]:
    """An app container running a busybox shell script."""
    return {
        "rootfs": {"dir": str(BUSYBOX_TREE), "all_root": True},
        "args": ["/bin/sh", "-c", script],
        **extra,
    }


def variant(tmp_path: Path, name: str, script: str, **extra: Any) -> dict[str, Any]:
    """An app on its own image (busybox + a marker file): updating to it sends one object."""
    tree = tmp_path / "trees" / name
    if not tree.exists():
        shutil.copytree(BUSYBOX_TREE, tree, symlinks=True)
        (tree / "etc" / "variant").write_text(name + "\n")
    return {**app(script, **extra), "rootfs": {"dir": str(tree), "all_root": True}}


def build_revision(
    tmp: Path, keys: Path, revision: int, containers: dict[str, Any], **top: Any
) -> Path:
    spec = tmp / f"spec-{revision}.yaml"
    spec.write_text(yaml.safe_dump({"revision": revision, "containers": containers, **top}))
    out = tmp / f"rev{revision}"
    pvpy("state", "build", spec, "--out", out)
    pvpy("state", "sign", out, "--key", keys)
    return out


class SandboxDevice:
    def __init__(self, storage: Path, log_path: Path) -> None:
        self.storage = storage
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.run_dir = sandbox_run_dir(storage)

    def start(self, *extra: str, env: dict[str, str] | None = None) -> SandboxDevice:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pvpy", "device", "run", "--storage", str(self.storage), *extra],
            stdout=log,
            stderr=log,
            env={**os.environ, "PVPY_TEST_FAULTS": "1", "PVPY_LOG_LEVEL": "debug", **(env or {})},
        )
        log.close()
        return self

    def request(self, request: dict[str, Any], timeout: float = 5) -> dict[str, Any]:
        return control.request(self.run_dir / "control.sock", request, timeout)

    def status(self) -> dict[str, Any]:
        return self.request({"cmd": "status"})

    def try_status(self) -> dict[str, Any] | None:
        try:
            return self.status()
        except DeviceError:
            return None

    def container(self, name: str) -> dict[str, Any]:
        status = self.status()
        return next(c for c in status["containers"] if c["name"] == name)

    def wait_for(
        self, what: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"sandbox ended ({self.proc.returncode}) waiting for {what}")
            last = self.try_status()
            if last is not None and predicate(last):
                return last
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; last status: {last}\n{self.tail()}")

    def wait_goals(self, timeout: float = 30) -> dict[str, Any]:
        return self.wait_for("all goals met", lambda s: bool(s.get("all_goals_met")), timeout)

    def pid1(self) -> int:
        """Host pid of the sandbox's PID 1."""
        out = subprocess.run(
            ["pgrep", "-f", f"pvpy init --sandbox --storage {self.storage} "],
            capture_output=True, text=True,
        ).stdout.split()  # fmt: skip
        assert out, "no PID 1 found"
        return int(out[0])

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_bytes().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def tail(self, n: int = 40) -> str:
        lines = self.log_path.read_bytes().decode(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 40) -> int:
        """Ctrl-C, as a user would; returns the launcher's exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as e:
            self.kill()
            raise AssertionError(f"sandbox did not power off in {timeout}s\n{self.tail()}") from e

    def kill(self) -> None:
        """Power cut: SIGKILL the launcher; the kernel takes everything down."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        deadline = time.monotonic() + 10
        while (
            time.monotonic() < deadline
            and subprocess.run(
                ["pgrep", "-f", f"--storage {self.storage} "], capture_output=True
            ).returncode
            == 0
        ):
            time.sleep(0.1)
        self.cleanup()

    def cleanup(self) -> None:
        crun_root = self.run_dir / "crun"
        if crun_root.is_dir():
            for entry in crun_root.iterdir():
                subprocess.run(
                    ["crun", "--root", str(crun_root), "delete", "--force", entry.name],
                    capture_output=True,
                )
        shutil.rmtree(self.run_dir, ignore_errors=True)
        # crun removes a container's cgroup, not our parent of them
        for top in Path("/sys/fs/cgroup").glob(f"*/pvpy-{self.run_dir.name}"):
            for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
