"""Run the device on any Linux host: the sandbox "firmware + bootloader".

``run`` plays firmware + bootloader: it picks the revision from the file boot
environment (``pvpy.device.bootenv.choose_boot``), then starts ``pvpy init`` as PID 1
of new pid+mount+uts+ipc namespaces — the same init code a board runs. When
that PID 1 calls reboot(2), the kernel kills it with SIGHUP (restart) or SIGINT
(halt/power off) as seen from here, the parent: SIGHUP boots again, SIGINT ends
the sandbox. Ctrl-C asks PID 1 to power off in order (SIGUSR2).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from pvpy import paths
from pvpy.device import _linux
from pvpy.device.storagelock import lock_storage
from pvpy.device.update import POWERCUT_EXIT
from pvpy.errors import DeviceError, StoreError
from pvpy.log import get_logger
from pvpy.store import Storage

log = get_logger("sandbox")

REBOOT_PAUSE = 1.0


def _wait(pid: int) -> int:
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except ChildProcessError:
            return 0


def _start_pid1(argv: list[str], cgroup2: Path | None) -> NoReturn:
    """In a forked child: new pid namespace, fork its PID 1, relay its end.

    unshare(CLONE_NEWPID) works once per process, so each boot gets a fresh
    intermediate process. It dies the way PID 1 died (SIGHUP = reboot,
    SIGINT = power off), so the launcher reads the same status a parent of
    the real PID 1 would.
    """
    try:
        # The launcher's signals are for PID 1 to act on, not for us: a
        # `timeout` or Ctrl-C to the process group must not orphan PID 1.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)
        # The launcher gone (killed) is a power cut: take the device down with it.
        _linux.set_parent_death_signal(signal.SIGKILL)
        _linux.unshare(_linux.CLONE_NEWPID)
        pid1 = os.fork()
        if pid1 == 0:
            _linux.set_parent_death_signal(signal.SIGKILL)
            if cgroup2 is not None:
                _enter_cgroup2(cgroup2)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
                signal.signal(sig, signal.SIG_DFL)
            _linux.unshare(_linux.CLONE_NEWNS | _linux.CLONE_NEWUTS | _linux.CLONE_NEWIPC)
            # Nothing we mount may leak to the host.
            _linux.mount("none", "/", None, _linux.MS_REC | _linux.MS_PRIVATE)
            os.setsid()  # the terminal's Ctrl-C reaches the launcher, not PID 1
            os.execv(sys.executable, [sys.executable, *argv])

        def relay(signum: int, _frame: object) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid1, signum)

        signal.signal(signal.SIGUSR2, relay)
        status = _wait(pid1)
        if os.WIFSIGNALED(status):
            died_of = os.WTERMSIG(status)
            signal.signal(died_of, signal.SIG_DFL)
            os.kill(os.getpid(), died_of)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    except BaseException as e:  # only on a broken host
        os.write(2, f"sandbox: cannot start PID 1: {e}\n".encode())
    os._exit(127)


def _enter_cgroup2(group: Path) -> None:
    """Move this process into ``group`` of the host's cgroup2 hierarchy beside v1
    (a hybrid host), before PID 1 starts: its containers' cgroup namespaces are then
    rooted there, not at the host's own cgroup2 root, where systemd in a host OS
    made its groups (init.scope, system.slice) for every device to share."""
    try:
        group.mkdir(exist_ok=True)
        (group / "cgroup.procs").write_text("0")
    except OSError as e:
        os.write(2, f"sandbox: cannot enter {group}: {e}\n".encode())


def _remove_cgroup2(group: Path) -> None:
    """The group and what the containers made in it, once they are gone (best effort)."""
    for path in sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            path.rmdir()
    with contextlib.suppress(OSError):
        group.rmdir()


def _boot_once(argv: list[str], cgroup2: Path | None = None) -> int:
    """Boot PID 1 of fresh namespaces running ``argv``; return its wait status."""
    pid = os.fork()
    if pid == 0:
        _start_pid1(argv, cgroup2)

    def relay(_signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR2)  # Ctrl-C: power off in order

    old = {s: signal.signal(s, relay) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _wait(pid)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run(
    storage_dir: Path, init_args: list[str], max_boots: int | None = None, max_tries: int = 1,
    on_first_boot: Callable[[int], None] | None = None,
) -> int:  # fmt: skip
    """Boot the sandboxed device until it powers off. Returns an exit code.
    ``on_first_boot(revision)`` runs once, before the first boot (the banner).

    Raises DeviceError when another device runs this storage (``storagelock``).
    """
    if os.geteuid() != 0:
        raise DeviceError("the sandbox needs root (namespaces, mounts, crun)")
    storage_dir = Path(storage_dir).resolve()
    if not Storage(storage_dir).revisions():
        raise StoreError(f"{storage_dir}: no revision installed (run `pvpy device provision`)")
    # Before anything is touched: a second device on this storage is refused, and
    # must not remove the first one's run dir (sockets) on its way out.
    lock = lock_storage(storage_dir)
    if sys.stderr.isatty() and "PVPY_LOG_JSON" not in os.environ:
        # a person watches: PID 1 and its helpers write readable lines (pvpy.log)
        os.environ["PVPY_LOG_TEXT"] = "1"
    try:
        return _run_locked(storage_dir, init_args, max_boots, max_tries, on_first_boot)
    finally:
        os.close(lock)


def _run_locked(
    storage_dir: Path, init_args: list[str], max_boots: int | None, max_tries: int,
    on_first_boot: Callable[[int], None] | None,
) -> int:  # fmt: skip
    from pvpy.device.bootenv import choose_boot
    from pvpy.device.bootenv.file import FileBootEnv

    env = FileBootEnv(storage_dir / paths.BOOTENV)
    run_dir = paths.sandbox_run_dir(storage_dir)
    unified = Path("/sys/fs/cgroup/unified")
    cgroup2 = unified / f"pvpy-{run_dir.name}" if (unified / "cgroup.procs").is_file() else None
    # PID 1 compares this with its own before calling reboot(2): never the host's.
    os.environ["PVPY_HOST_PIDNS"] = os.readlink("/proc/self/ns/pid")
    boots = 0
    try:
        while max_boots is None or boots < max_boots:
            boots += 1
            choice = choose_boot(env, max_tries=max_tries)
            if boots == 1 and on_first_boot is not None:
                on_first_boot(choice.revision)
            log.info("boot", n=boots, revision=choice.revision, trying=choice.trying)
            # A board's /run is a tmpfs: every boot starts with it empty. Ours is a
            # host directory that outlives PID 1 (a power cut, a reboot, a launcher
            # killed earlier), and crun state left in RUN/crun made the next boot
            # fail with "container hostos already exists". The storage lock is ours:
            # no other device uses this run dir.
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            argv = [
                "-m", "pvpy", "init", "--sandbox",
                "--storage", str(storage_dir),
                "--run-dir", str(run_dir),
                "--boot-revision", str(choice.revision),
            ]  # fmt: skip
            if choice.trying:
                argv.append("--trying")
            if choice.failed_try is not None:
                argv += ["--failed-try", str(choice.failed_try)]
            status = _boot_once(argv + init_args, cgroup2)
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == POWERCUT_EXIT:
                # A simulated power cut happens once: later boots run without it.
                os.environ.pop("PVPY_POWERCUT", None)
                log.info("power cut", revision=choice.revision)
                time.sleep(REBOOT_PAUSE)
                continue
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGHUP:
                log.info("reboot", revision=choice.revision)
                time.sleep(REBOOT_PAUSE)  # a board takes seconds to reboot; so do we
                continue
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGINT:
                log.info("power off", revision=choice.revision)
                return 0
            # PID 1 exited: on a board the kernel panics. Say so; do not boot again.
            code = os.waitstatus_to_exitcode(status)
            log.error("init exited", status=code)
            return 1
        return 0
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        if cgroup2 is not None:
            _remove_cgroup2(cgroup2)
