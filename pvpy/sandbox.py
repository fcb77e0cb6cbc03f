"""Run the device on any Linux host: provisioning and the sandbox "bootloader".

``provision`` installs a verified factory revision into an empty storage dir.
``run`` plays firmware + bootloader: it picks the revision from the file boot
environment (``pvpy.bootenv.choose_boot``), then starts ``pvpy init`` as PID 1
of new pid+mount+uts+ipc namespaces — the same init code a board runs. When
that PID 1 calls reboot(2), the kernel kills it with SIGHUP (restart) or SIGINT
(halt/power off) as seen from here, the parent: SIGHUP boots again, SIGINT ends
the sandbox. Ctrl-C asks PID 1 to power off in order (SIGUSR2).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

from pvpy import _linux
from pvpy.errors import DeviceError, StoreError
from pvpy.log import get_logger
from pvpy.store import Storage
from pvpy.update import POWERCUT_EXIT

log = get_logger("sandbox")

BOOTENV_FILE = "bootenv"
REBOOT_PAUSE = 1.0
TRUST_DIR = "trust"


def bootenv_for(storage: Path) -> object:
    from pvpy.bootenv.file import FileBootEnv

    return FileBootEnv(Path(storage) / BOOTENV_FILE)


def run_dir_for(storage: Path) -> Path:
    """The sandbox's /run/pvpy: on the host's /run so host tools reach its sockets."""
    digest = hashlib.sha256(str(Path(storage).resolve()).encode()).hexdigest()[:12]
    return Path("/run/pvpy-sandbox") / digest


def provision(storage_dir: Path, signed_dir: Path, trust_files: list[Path]) -> int:
    """Install the factory revision: verify it, copy its objects, set pv_rev.

    Refuses a storage that already holds a revision. Returns the revision.
    """
    from pvpy.bootenv.file import FileBootEnv
    from pvpy.signing import TrustStore
    from pvpy.trust import verify_revision_dir

    storage = Storage(Path(storage_dir))
    if storage.revisions():
        raise DeviceError(f"{storage_dir} already holds revisions {storage.revisions()}")
    trust = TrustStore.from_files(trust_files)
    verified = verify_revision_dir(Path(signed_dir), trust)
    storage.ensure()
    src = Path(signed_dir) / "objects"
    for ref in verified.state.objects().values():
        storage.objects.put_file(src / ref.sha256, expected=ref.sha256)
    trust_dir = storage.root / TRUST_DIR
    trust_dir.mkdir(exist_ok=True)
    for i, path in enumerate(trust_files):
        shutil.copyfile(path, trust_dir / f"{i:02d}-{Path(path).name}")
    storage.install_revision(verified.revision, verified.state_bytes, verified.signature_bytes)
    FileBootEnv(storage.root / BOOTENV_FILE).write({"pv_rev": str(verified.revision)})
    make_api_token(storage.root)
    log.info("provisioned", revision=verified.revision, storage=str(storage_dir))
    return verified.revision


API_TOKEN_FILE = Path("config") / "api-token"


def make_api_token(storage: Path) -> Path:
    """The device's API bearer token (STORAGE/config/api-token, 0600), made once."""
    import secrets

    path = Path(storage) / API_TOKEN_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            # hex: a token must survive `--token TOKEN` (urlsafe ones may start with "-")
            f.write(secrets.token_hex(24) + "\n")
    return path


def load_trust(storage: Path) -> object:
    from pvpy.signing import TrustStore

    files = sorted((Path(storage) / TRUST_DIR).glob("*"))
    if not files:
        raise DeviceError(f"{storage}: no trusted keys (run `pvpy device provision`)")
    return TrustStore.from_files(files)


def _wait(pid: int) -> int:
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except ChildProcessError:
            return 0


def _start_pid1(argv: list[str]) -> NoReturn:
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


def _boot_once(argv: list[str]) -> int:
    """Boot PID 1 of fresh namespaces running ``argv``; return its wait status."""
    pid = os.fork()
    if pid == 0:
        _start_pid1(argv)

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
    storage_dir: Path, init_args: list[str], max_boots: int | None = None, max_tries: int = 1
) -> int:
    """Boot the sandboxed device until it powers off. Returns an exit code."""
    from pvpy.bootenv import choose_boot
    from pvpy.bootenv.file import FileBootEnv

    if os.geteuid() != 0:
        raise DeviceError("the sandbox needs root (namespaces, mounts, crun)")
    storage_dir = Path(storage_dir).resolve()
    if not Storage(storage_dir).revisions():
        raise StoreError(f"{storage_dir}: no revision installed (run `pvpy device provision`)")
    env = FileBootEnv(storage_dir / BOOTENV_FILE)
    run_dir = run_dir_for(storage_dir)
    # PID 1 compares this with its own before calling reboot(2): never the host's.
    os.environ["PVPY_HOST_PIDNS"] = os.readlink("/proc/self/ns/pid")
    boots = 0
    try:
        while max_boots is None or boots < max_boots:
            boots += 1
            choice = choose_boot(env, max_tries=max_tries)
            log.info("boot", n=boots, revision=choice.revision, trying=choice.trying)
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
            status = _boot_once(argv + init_args)
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
