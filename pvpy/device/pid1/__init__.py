"""``pvpy init``: the first process. It must never exit and never die.

Duties, in order (see ``Init.run``):

1. early mounts (proc, sys, devtmpfs, /run, /dev/pts, /dev/shm, cgroups — on a
   board; in the sandbox only a fresh /proc and a cgroup layout crun accepts);
2. signals: every signal we care about gets a do-nothing handler and is
   delivered through a wakeup pipe, so the loop handles them in plain code
   (SIGCHLD reap · SIGTERM, SIGINT (ctrl-alt-del) reboot · SIGUSR1 halt ·
   SIGUSR2, SIGPWR power off · SIGHUP ignored);
3. the hardware watchdog, fed from the loop only while the loop is healthy;
4. boot: verify the chosen revision in a short-lived child (signature,
   schema, objects: the heavy crypto never lives in PID 1), fall back to
   older installed revisions when it does not verify, and start its
   containers; with nothing runnable, stay up (control socket alive);
5. the loop: wait on the wakeup pipe, container output, ready
   notifications and the control socket until the next deadline; reap every
   child with waitpid(-1, WNOHANG); let the supervisor act. An exception in
   an iteration is logged and the loop goes on;
6. shutdown: stop containers in reverse order, sync, unmount in reverse,
   reboot(2) (restart, halt or power off).

Only the standard library and pvpy's lean modules are imported here.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pvpy.device import _linux
from pvpy.device.apply import Applier
from pvpy.log import configure, get_logger

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from typing import Any, NoReturn

log = get_logger("init")

HANDLED_SIGNALS = (
    signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2,
    signal.SIGHUP, signal.SIGPWR,
)  # fmt: skip
SIGNAL_ACTIONS = {
    signal.SIGTERM: "reboot",
    signal.SIGINT: "reboot",  # ctrl-alt-del
    signal.SIGUSR1: "halt",
    signal.SIGUSR2: "poweroff",
    signal.SIGPWR: "poweroff",
}
REBOOT_COMMANDS = {
    "reboot": _linux.RB_AUTOBOOT,
    "halt": _linux.RB_HALT_SYSTEM,
    "poweroff": _linux.RB_POWER_OFF,
}
WEDGED_AFTER = 5  # consecutive failed loop iterations: stop feeding the watchdog
SHUTDOWN_GRACE = 10.0  # seconds beyond the longest container stop timeout
MAX_REQUEST = 64 * 1024
CLIENT_TIMEOUT = 2.0


class Watchdog:
    """/dev/watchdog (or a test path): fed from the loop while it is healthy."""

    def __init__(self, path: str | None, interval: float) -> None:
        self.fd: int | None = None
        self.interval = interval
        self.last = 0.0
        if path and os.path.exists(path):
            try:
                self.fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                log.info("watchdog opened", path=path, interval=interval)
            except OSError as e:
                log.warning("watchdog unavailable", path=path, error=str(e))

    def feed(self, now: float) -> None:
        if self.fd is not None and now - self.last >= self.interval:
            with contextlib.suppress(OSError):
                os.write(self.fd, b"1")
            self.last = now

    def disarm(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.fd, b"V")  # magic close: an orderly stop is no hang
                os.close(self.fd)
            self.fd = None


def _noop(_signum: int, _frame: object) -> None:
    """Signals only wake the loop (through the wakeup fd); the loop acts."""


class Helper:
    """A long-running helper process PID 1 keeps alive (never part of PID 1):
    restarted with backoff when it dies; a hostile client or a hung registry can
    at worst take that process down, never stall PID 1's loop."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.argv = [sys.executable, "-m", "pvpy", *argv]
        self.pid: int | None = None
        self.next_start = 0.0
        self.failures = 0

    def ensure(self, now: float) -> None:
        if self.pid is not None or now < self.next_start:
            return
        from pvpy import _run

        try:
            self.pid = _run.spawn(self.argv, new_session=True)
            log.info("helper started", helper=self.name, pid=self.pid)
        except Exception as e:
            log.error("helper cannot start", helper=self.name, error=str(e))
            self.exited(None, now)

    def exited(self, status: int | None, now: float) -> None:
        if status is not None:
            log.warning("helper exited", helper=self.name,
                        status=os.waitstatus_to_exitcode(status))  # fmt: skip
        self.pid = None
        self.failures += 1
        self.next_start = now + min(2 ** min(self.failures, 5), 30)

    def stop(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)


class Init:
    def __init__(self, args: Options) -> None:
        self.args = args
        self.sandbox: bool = args.sandbox
        self.storage = Path(args.storage)
        self.run_dir = Path(args.run_dir)
        self.mounted: list[str] = []
        self.selector = selectors.DefaultSelector()
        self.supervisor: Any = None
        self.revision: int | None = None
        self.pending: str | None = None  # reboot / halt / poweroff in progress
        self.pending_reason = ""
        self.shutdown_deadline = 0.0
        self.failures = 0
        self.fault: str | None = None
        self.watchdog = Watchdog(args.watchdog, args.watchdog_interval)
        self.clients: dict[socket.socket, tuple[bytearray, float]] = {}
        self.supervised: dict[int, int] = {}  # fd -> token of the supervisor's fds
        self.boot_error: str | None = None
        self.booted_at = time.monotonic()
        self.updates = Applier(self)
        self.bootenv: Any = None
        self.helpers: list[Helper] = []
        self.verifiers: dict[int, tuple[int, Callable[[int, str | None], None], int]] = {}
        self.boot_candidates: list[int] = []
        self.reboot_argument: str | None = None  # reboot(2) RESTART2's (the Pi's tryboot)
        self.failed_try_reason: str | None = None  # why the boot env says failed_try failed
        self.board_bootenv: Any = None  # a boot env the board set up (the Pi's tryboot)
        self.board_config: Any = None
        self.storage_device: str | None = None

    # -- 1. early mounts -------------------------------------------------------

    def _mount(self, source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
        if _linux.mounted(target):
            return
        try:
            os.makedirs(target, exist_ok=True)
            _linux.mount(source, target, fstype, flags, data)
            self.mounted.append(target)
        except OSError as e:
            log.warning("mount failed", target=target, fstype=fstype, error=str(e))

    def early_mounts(self) -> None:
        nosuid_nodev_noexec = _linux.MS_NOSUID | _linux.MS_NODEV | _linux.MS_NOEXEC
        if self.sandbox:
            # Our own pid namespace needs its own /proc (private mount ns).
            _linux.mount("proc", "/proc", "proc", nosuid_nodev_noexec)
            self.mounted.append("/proc")
        else:
            self._mount("proc", "/proc", "proc", nosuid_nodev_noexec)
            self._mount("sysfs", "/sys", "sysfs", nosuid_nodev_noexec)
            self._mount("devtmpfs", "/dev", "devtmpfs", _linux.MS_NOSUID, "mode=0755")
            self._mount("devpts", "/dev/pts", "devpts", _linux.MS_NOSUID | _linux.MS_NOEXEC,
                        "gid=5,mode=620,ptmxmode=666")  # fmt: skip
            self._mount("tmpfs", "/dev/shm", "tmpfs", _linux.MS_NOSUID | _linux.MS_NODEV,
                        "mode=1777")  # fmt: skip
            self._mount("tmpfs", "/run", "tmpfs", _linux.MS_NOSUID | _linux.MS_NODEV, "mode=755")
        self.setup_cgroups()
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def setup_cgroups(self) -> None:
        """Give crun a cgroup layout it accepts: cgroup2 alone, or plain v1.

        crun refuses hybrid layouts (cgroup2 holding a controller beside v1),
        so a sandbox on a hybrid host drops the v2 mount in its private mount
        namespace; a board mounts cgroup2 alone when the kernel has it.
        """
        if self.sandbox:
            self.sandbox_cgroups()
            return
        if _linux.mounted("/sys/fs/cgroup"):
            return
        try:
            filesystems = Path("/proc/filesystems").read_text()
        except OSError:
            filesystems = ""
        if "cgroup2" in filesystems:
            self._mount("cgroup2", "/sys/fs/cgroup", "cgroup2", _linux.MS_NOSUID | _linux.MS_NODEV
                        | _linux.MS_NOEXEC, "nsdelegate")  # fmt: skip
            with contextlib.suppress(OSError):
                controllers = Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
                Path("/sys/fs/cgroup/cgroup.subtree_control").write_text(
                    " ".join(f"+{c}" for c in controllers)
                )
            return
        self._mount("tmpfs", "/sys/fs/cgroup", "tmpfs", 0, "mode=755")
        for line in Path("/proc/cgroups").read_text().splitlines()[1:]:
            name, _, _, enabled = line.split()
            if enabled == "1":
                self._mount("cgroup", f"/sys/fs/cgroup/{name}", "cgroup", 0, name)

    def sandbox_cgroups(self) -> None:
        """On a hybrid host, rebuild /sys/fs/cgroup with the v1 hierarchies only.

        A fresh tmpfs of our own (private mount namespace) gets each v1
        hierarchy mounted again with the host's options, and the host's
        symlinks (cpu -> cpu,cpuacct). Merely unmounting the v2 part would let
        crun write stray files into the host's own /sys/fs/cgroup tmpfs.
        """
        root = "/sys/fs/cgroup"
        v1: list[tuple[str, str]] = []
        hybrid = False
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                mountpoint, fstype, options = fields[4], fields[sep + 1], fields[sep + 3]
                if os.path.dirname(mountpoint) != root:
                    continue
                if fstype == "cgroup2":
                    hybrid = True
                elif fstype == "cgroup":
                    opts = ",".join(o for o in options.split(",") if o not in ("rw", "ro"))
                    v1.append((os.path.basename(mountpoint), opts))
        if not (hybrid and v1):
            return
        links = {
            entry.name: os.readlink(entry.path)
            for entry in os.scandir(root)
            if entry.is_symlink()
        }
        _linux.mount("cgroup_root", root, "tmpfs", 0, "mode=755")
        for name, opts in v1:
            os.mkdir(f"{root}/{name}")
            _linux.mount("cgroup", f"{root}/{name}", "cgroup", 0, opts)
        for name, target in links.items():
            with contextlib.suppress(OSError):
                os.symlink(target, f"{root}/{name}")
        log.info("cgroup: hybrid host, sandbox uses the v1 hierarchies", hierarchies=len(v1))

    def board_setup(self, board_file: str) -> None:
        """On a board (``--board``): modules, storage, network, the boot choice.

        The sandbox launcher passes the boot choice as flags; on a board the
        bootloader passes it on the kernel command line (boards/*/boot.cmd).
        The watchdog is opened again: its driver is one of the modules.
        """
        from pvpy.device import board

        config = board.load(Path(board_file))
        self.board_config = config
        choice = board.boot_choice(Path("/proc/cmdline").read_text())
        board.load_modules(config)
        self.storage_device = board.mount_storage(config, self.storage, choice.storage)
        self.mounted.append(str(self.storage))
        board.setup_network(config)
        if config.rpi:
            choice = self.rpi_setup(config, choice)
        if self.args.boot_revision is None:
            self.args.boot_revision = choice.revision
            self.args.trying = choice.trying
            self.args.failed_try = choice.failed_try
        log.info("boot choice", revision=choice.revision, trying=choice.trying,
                 failed_try=choice.failed_try)  # fmt: skip
        if self.watchdog.fd is None and self.args.watchdog:
            board.wait_for(self.args.watchdog, config.watchdog_timeout)
            self.watchdog = Watchdog(self.args.watchdog, self.args.watchdog_interval)

    def rpi_setup(self, config: Any, cmdline: Any) -> Any:
        """On a Raspberry Pi: the boot env is tryboot's, on the mounted config partition,
        and the boot choice comes from it and the firmware's device-tree flag; the
        cmdline's pv_rev only checks it. When the config partition is unusable, the
        cmdline's choice and the storage's boot env stand (no try-boot updates then)."""
        from pvpy.device.board import rpi
        from pvpy.errors import PvpyError

        try:
            env = rpi.open_rpi_bootenv(config, self.storage_device or "", rpi.RPI_CONFIG_DIR)
        except PvpyError as e:
            log.error("rpi config partition unusable; boot env stays in the storage",
                      error=str(e))  # fmt: skip
            return cmdline
        self.mounted.append(rpi.RPI_CONFIG_DIR)
        self.board_bootenv = env
        try:
            choice, self.failed_try_reason = rpi.rpi_boot_choice(env, cmdline)
        except PvpyError as e:
            log.error("rpi boot choice unreadable; booting the cmdline's", error=str(e))
            return cmdline
        return choice

    def start_write_boot(self, revision: int, done: Callable[[int, str | None], None]) -> None:
        """Write ``revision``'s boot files into the try boot partition, in a child
        (the copying and hashing stay out of PID 1; the loop keeps running)."""
        from pvpy.device.board import rpi

        target = rpi.rpi_try_partition(self.board_config, self.board_bootenv,
                                         self.storage_device or "")  # fmt: skip
        if target is None:
            done(revision, "the try boot partition was not found")
            return
        argv = [sys.executable, "-m", "pvpy", "device", "write-boot", "--storage",
                str(self.storage), "--revision", str(revision), "--target", target,
                "--board", str(self.args.board)]  # fmt: skip
        self.start_child(argv, revision, done)

    # -- 2. signals --------------------------------------------------------------

    def setup_signals(self) -> None:
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, _noop)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self.signal_fd = read_fd
        self.selector.register(read_fd, selectors.EVENT_READ, self.on_signals)
        if not self.sandbox:
            with contextlib.suppress(OSError):
                _linux.reboot(0)  # LINUX_REBOOT_CMD_CAD_OFF: ctrl-alt-del -> SIGINT to us

    def on_signals(self, fd: int) -> None:
        try:
            data = os.read(fd, 512)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGCHLD:
                continue  # reaping happens every iteration anyway
            sig = signal.Signals(signum)
            action = SIGNAL_ACTIONS.get(sig)
            name = sig.name
            if action is None:
                log.info("signal ignored", signal=name)
            else:
                self.request(action, f"signal {name}")

    # -- 4. boot -----------------------------------------------------------------

    def start_verify(self, revision: int, done: Callable[[int, str | None], None]) -> None:
        """Verify an installed revision in a child process; ``done(revision, problem)``
        runs from the loop when it exits (problem None when good).

        The crypto and the hashing of every object happen there, never in
        PID 1, and the loop keeps running meanwhile (signals, watchdog, API).
        """
        argv = [sys.executable, "-m", "pvpy", "device", "verify-installed",
                "--storage", str(self.storage), "--revision", str(revision)]  # fmt: skip
        self.start_child(argv, revision, done)

    def start_child(
        self, argv: list[str], revision: int, done: Callable[[int, str | None], None]
    ) -> None:
        """Run ``argv``; ``done(revision, problem)`` from the loop when it exits
        (problem: the last line of its stderr, None when it exited 0)."""
        from pvpy import _run

        read_fd, write_fd = os.pipe()
        try:
            pid = _run.spawn(argv, stderr=write_fd, new_session=False)
        except Exception as e:
            os.close(read_fd)
            done(revision, str(e))
            return
        finally:
            os.close(write_fd)
        os.set_blocking(read_fd, False)
        self.verifiers[pid] = (revision, done, read_fd)

    def verifier_exited(self, pid: int, status: int) -> bool:
        entry = self.verifiers.pop(pid, None)
        if entry is None:
            return False
        revision, done, read_fd = entry
        try:
            output = os.read(read_fd, 65536)  # one error line: fits the pipe
        except OSError:
            output = b""
        os.close(read_fd)
        problem = None
        if status != 0:
            lines = output.decode(errors="replace").strip().splitlines()
            problem = lines[-1] if lines else f"verifier {os.waitstatus_to_exitcode(status)}"
        done(revision, problem)
        return True

    def candidates(self) -> list[int]:
        """The boot revision first, then older installed ones, newest first."""
        from pvpy.store import Storage

        boot = self.args.boot_revision
        others = sorted((r for r in Storage(self.storage).revisions() if r != boot), reverse=True)
        return [boot, *others] if boot is not None else others

    def boot(self) -> None:
        """Start verifying the boot candidates, one after the other (see ``boot_verified``)."""
        from pvpy.store import Storage

        Storage(self.storage).clean_temp()
        self.bootenv = self.open_bootenv()
        self.helpers = self.helper_processes()
        self.boot_candidates = self.candidates()
        self.boot_next()

    def boot_next(self) -> None:
        if not self.boot_candidates:
            log.error("no revision can run; staying up without containers", reason=self.boot_error)
            self.updates.reconcile(None)
            return
        self.start_verify(self.boot_candidates.pop(0), self.boot_verified)

    def boot_verified(self, revision: int, problem: str | None) -> None:
        from pvpy.device.runtime import Paths, Runtime
        from pvpy.device.supervisor import Supervisor
        from pvpy.state import canonical
        from pvpy.state.model import State
        from pvpy.store import Storage

        if problem is not None:
            log.error("revision refused", revision=revision, reason=problem)
            self.boot_error = f"revision {revision}: {problem}"
            self.boot_next()
            return
        state_bytes, _ = Storage(self.storage).read_trail(revision)
        state = State.from_dict(canonical.decode(state_bytes))
        paths = Paths(storage=self.storage, run=self.run_dir)
        cgroup_parent = "pvpy" if not self.sandbox else f"pvpy-{self.run_dir.name}"
        runtime = Runtime(paths, self.args.runtime, cgroup_parent=cgroup_parent)
        self.supervisor = Supervisor(state, runtime, on_device_request=self.on_device_request)
        self.revision = revision
        log.info("booting revision", revision=revision, trying=self.args.trying)
        self.updates.reconcile(revision)
        self.supervisor.start()

    def open_bootenv(self) -> Any:
        from pvpy.device.bootenv import open_bootenv

        if self.board_bootenv is not None and not self.args.bootenv:
            return self.board_bootenv
        return open_bootenv(self.args.bootenv or f"file:{self.storage / 'bootenv'}")

    def setup_control(self) -> None:
        path = self.run_dir / "control.sock"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        os.chmod(path, 0o600)  # root only
        sock.listen(16)
        sock.setblocking(False)
        self.control = sock
        self.selector.register(sock, selectors.EVENT_READ, self.on_accept)

    def on_accept(self, _fd: int) -> None:
        try:
            conn, _ = self.control.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self.clients[conn] = (bytearray(), time.monotonic())
        self.selector.register(conn, selectors.EVENT_READ, lambda _fd, c=conn: self.on_client(c))

    def _drop_client(self, conn: socket.socket) -> None:
        self.clients.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        conn.close()

    def on_client(self, conn: socket.socket) -> None:
        buf, _ = self.clients[conn]
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop_client(conn)
            return
        buf.extend(data)
        if b"\n" not in buf:
            if len(buf) > MAX_REQUEST:
                self._drop_client(conn)
            return
        line = bytes(buf).split(b"\n", 1)[0]
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("request must be an object")
            reply = self.handle(request)
        except Exception as e:  # a bad request must never hurt PID 1
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        with contextlib.suppress(OSError):
            conn.settimeout(1.0)
            conn.sendall(json.dumps(reply).encode() + b"\n")
        self._drop_client(conn)

    def status(self) -> dict[str, Any]:
        from pvpy.device import update as up

        sup = self.supervisor.status() if self.supervisor else {
            "containers": [], "all_goals_met": False, "goals_missed": [], "group": None,
        }  # fmt: skip
        env: dict[str, str] = {}
        with contextlib.suppress(Exception):
            env = self.bootenv.read() if self.bootenv else {}
        return {
            "ok": True,
            "pid": os.getpid(),
            **sup,
            "revision": self.revision,
            "committed": int(env["pv_rev"]) if env.get("pv_rev", "").isdigit() else None,
            "try": int(env["pv_try"]) if env.get("pv_try", "").isdigit() else None,
            "updating": self.updates.update.revision if self.updates.update else None,
            "updates": [p.to_dict() for p in up.all_progress(self.storage)],
            "trying": self.updates.trying,
            "boot_error": self.boot_error,
            "pending": self.pending,
            "uptime": round(time.monotonic() - self.booted_at, 3),
        }

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd == "status":
            return self.status()
        if cmd in REBOOT_COMMANDS:
            self.request(str(cmd), "control socket")
            return {"ok": True}
        if cmd in ("restart", "stop") and self.supervisor is not None:
            name = request.get("container")
            if name not in self.supervisor.containers:
                return {"ok": False, "error": f"no container {name!r}"}
            self.supervisor.stop(name)
            if cmd == "restart":
                self.supervisor.containers[name].restart_requested = True
            return {"ok": True}
        if cmd == "update":
            revision = request.get("revision")
            if not isinstance(revision, int) or isinstance(revision, bool):
                return {"ok": False, "error": "revision must be an integer"}
            return self.updates.begin(revision)
        if cmd == "rollback":
            return self.updates.rollback()
        if cmd == "inject" and os.environ.get("PVPY_TEST_FAULTS") == "1":
            self.fault = str(request.get("fault"))
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    # -- 5. the loop --------------------------------------------------------------------

    def helper_processes(self) -> list[Helper]:
        """The long-running helpers this device is configured for (read after the
        storage is mounted): the API server, the registry puller."""
        base = ["--storage", str(self.storage), "--run-dir", str(self.run_dir)]
        helpers = []
        if self.args.api or self.args.api_tcp:
            argv = ["device", "api", *base]
            if self.args.api_tcp:
                argv += ["--tcp", self.args.api_tcp,
                         "--token-file", str(self.storage / "config" / "api-token")]  # fmt: skip
            helpers.append(Helper("api server", argv))
        pull = self.pull_config()
        if pull is not None:
            argv = ["device", "pull", *base, "--from", str(pull["from"]),
                    "--interval", str(pull.get("interval", 60))]  # fmt: skip
            if pull.get("plain_http"):
                argv.append("--plain-http")
            helpers.append(Helper("registry puller", argv))
        return helpers

    def pull_config(self) -> dict[str, Any] | None:
        """--pull REF on the command line, else STORAGE/config/pull.json."""
        if self.args.pull:
            return {"from": self.args.pull, "interval": self.args.pull_interval,
                    "plain_http": self.args.pull_plain_http}  # fmt: skip
        try:
            config = json.loads((self.storage / "config" / "pull.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.error("config/pull.json unreadable; not pulling", error=str(e))
            return None
        if not isinstance(config, dict) or not isinstance(config.get("from"), str):
            log.error("config/pull.json needs a \"from\" registry reference; not pulling")
            return None
        return config

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.verifier_exited(pid, status):
                continue
            helper = next((h for h in self.helpers if h.pid == pid), None)
            if helper is not None:
                helper.exited(status, time.monotonic())
                continue
            if self.supervisor is None or not self.supervisor.on_exit(pid, status):
                log.debug("reaped", pid=pid, status=status)

    def step(self) -> None:
        if self.fault == "raise":
            self.fault = None
            raise RuntimeError("injected fault")
        if self.fault == "hang":
            time.sleep(3600)  # a wedged loop: the watchdog must stop being fed
        now = time.monotonic()
        deadline = self.supervisor.next_deadline() if self.supervisor else None
        if self.pending:
            deadline = min(deadline or now + 1, self.shutdown_deadline)
        timeout = 1.0 if deadline is None else min(max(deadline - now, 0.0), 1.0)
        if self.watchdog.fd is not None:
            timeout = min(timeout, self.watchdog.interval)
        self.sync_fds()
        for key, _ in self.selector.select(timeout):
            key.data(key.fd)
        self.reap()
        if self.supervisor is not None:
            self.supervisor.tick()
        now = time.monotonic()
        self.updates.check(now)
        self.updates.check_health()
        if not self.pending:
            for helper in self.helpers:
                helper.ensure(now)
        for conn, (_, since) in list(self.clients.items()):
            if now - since > CLIENT_TIMEOUT:
                self._drop_client(conn)
        if self.pending and (
            (
                (self.supervisor is None or self.supervisor.all_stopped())
                and all(h.pid is None for h in self.helpers)
            )
            or now >= self.shutdown_deadline
        ):
            self.finish()

    def sync_fds(self) -> None:
        """Keep the selector watching exactly the supervisor's open fds.

        Container output pipes and notify FIFOs come and go with containers;
        each open fd carries a token, so a reused fd number is registered anew.
        """
        if self.supervisor is None:
            return
        wanted: dict[int, int] = self.supervisor.watched_fds()
        for fd, token in list(self.supervised.items()):
            if wanted.get(fd) != token:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self.selector.unregister(fd)
                del self.supervised[fd]
        for fd, token in wanted.items():
            if fd not in self.supervised:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(fd)  # a stale entry under a reused number
                self.selector.register(fd, selectors.EVENT_READ, self.supervisor.on_fd)
                self.supervised[fd] = token

    def loop(self) -> NoReturn:
        while True:
            try:
                self.step()
                self.failures = 0
            except Exception:
                self.failures += 1
                log.exception("loop iteration failed; going on", failures=self.failures)
                time.sleep(min(0.1 * self.failures, 1.0))  # no busy spin on a stuck error
            if self.failures < WEDGED_AFTER:
                self.watchdog.feed(time.monotonic())
            elif self.failures == WEDGED_AFTER:
                log.error("supervisor wedged: no longer feeding the watchdog")

    # -- 6. shutdown -----------------------------------------------------------------------

    def on_device_request(self, action: str, reason: str) -> None:
        """The supervisor asks for a reboot/power off (the host OS ended or failed).

        While an update is testing, that is the update failing: record it and
        roll back first, so the next boot does not try it again.
        """
        u = self.updates.update
        if u is not None and u.phase == "testing" and action == "reboot":
            self.updates.fail(u, reason)
        self.request(action, reason)

    def request(self, action: str, reason: str, argument: str | None = None) -> None:
        """Stop everything, then reboot/halt/power off (``argument``: reboot(2)'s
        RESTART2 string, e.g. the Pi's "0 tryboot")."""
        if self.pending is not None:
            return
        log.info("shutdown requested", action=action, reason=reason, argument=argument)
        self.pending = action
        self.reboot_argument = argument
        self.pending_reason = reason
        for helper in self.helpers:
            helper.stop()
        longest = 0.0
        if self.supervisor is not None:
            longest = max(
                (m.spec.stop_timeout_ms / 1000 for m in self.supervisor.containers.values()),
                default=0.0,
            )
            self.supervisor.stop_all()
        self.shutdown_deadline = time.monotonic() + longest + SHUTDOWN_GRACE

    def finish(self) -> NoReturn:
        action = self.pending or "reboot"
        log.info("containers stopped", action=action)
        os.sync()
        if self.supervisor is not None:
            for m in self.supervisor.containers.values():
                with contextlib.suppress(Exception):
                    self.supervisor.runtime.cleanup(m.spec)
            self.supervisor.close_fds()
            if self.sandbox:  # a board's cgroups vanish with it; the host's do not
                with contextlib.suppress(Exception):
                    self.supervisor.runtime.remove_cgroups()
        if action != "reboot":
            self.watchdog.disarm()
        for target in reversed(self.mounted):
            with contextlib.suppress(OSError):
                _linux.umount(target, _linux.MNT_DETACH)
        os.sync()
        log.info("goodbye", action=action)
        self.reboot(action)

    def reboot(self, action: str) -> NoReturn:
        cmd = REBOOT_COMMANDS[action]
        if self.sandbox and _same_pid_ns_as_host():
            # Never reboot the machine we are a guest on.
            log.error("sandbox is not in its own pid namespace; exiting instead of reboot(2)")
            os._exit(3)
        if action == "reboot" and self.reboot_argument:
            try:
                _linux.reboot_with_argument(self.reboot_argument)
            except OSError as e:  # a plain restart boots the committed revision: safe
                log.error("reboot(2) with an argument failed; plain restart",
                          argument=self.reboot_argument, error=str(e))  # fmt: skip
        while True:
            try:
                _linux.reboot(cmd)
            except OSError as e:
                log.error("reboot(2) failed; retrying", error=str(e))
            time.sleep(1)

    def run(self) -> NoReturn:
        try:
            self.early_mounts()
            self.setup_signals()
            self.setup_control()
        except Exception:
            log.exception("early setup failed; going on")
        if self.args.board and not self.sandbox:
            try:
                self.board_setup(self.args.board)
            except Exception:
                log.exception("board setup failed; going on")
        try:
            self.boot()
        except Exception:
            log.exception("boot failed; staying up without containers")
        self.loop()


def _same_pid_ns_as_host() -> bool:
    host = os.environ.get("PVPY_HOST_PIDNS")
    try:
        mine = os.readlink("/proc/self/ns/pid")
    except OSError:
        return True
    return host is None or host == mine


class Options:
    """PID 1's flags, with their defaults (``pvpy init --help`` lists them)."""

    sandbox: bool = False
    storage: str = "/storage"
    run_dir: str = "/run/pvpy"
    boot_revision: int | None = None
    trying: bool = False
    failed_try: int | None = None
    runtime: str = "crun"
    watchdog: str = "/dev/watchdog"
    watchdog_interval: float = 5.0
    bootenv: str | None = None
    api: bool = False
    api_tcp: str | None = None
    pull: str | None = None
    pull_interval: float = 60.0
    pull_plain_http: bool = False
    commit_delay: float = 25.0
    commit_timeout: float = 120.0
    board: str | None = None
    log_level: str | None = None


# flag -> (kind, metavar, help). kind: "flag" (no value), str, int, float or a tuple of
# choices. Not argparse: its import (~0.7 MiB with gettext and locale) would stay in
# PID 1 for its whole life, to parse an argv that the launcher or the image wrote.
OPTIONS: dict[str, tuple[object, str, str]] = {
    "--sandbox": ("flag", "", "run in a sandbox (set by `device run`)"),
    "--storage": (str, "DIR", "storage root"),
    "--run-dir": (str, "DIR", "volatile state dir"),
    "--boot-revision": (int, "N", "revision the bootloader chose"),
    "--trying": ("flag", "", "the boot revision is on trial"),
    "--failed-try": (int, "N", "a try revision that did not commit"),
    "--runtime": (("crun", "runc"), "crun|runc", "OCI runtime"),
    "--watchdog": (str, "DEV", "watchdog device"),
    "--watchdog-interval": (float, "SECONDS", "seconds between feeds"),
    "--bootenv": (str, "KIND:PATH", "boot environment, e.g. file:/storage/bootenv"),
    "--api": ("flag", "", "run the device API server (unix socket RUN_DIR/api.sock)"),
    "--api-tcp": (str, "HOST:PORT",
                  "also serve the API on TCP (bearer token in STORAGE/config/api-token)"),
    "--pull": (str, "REGISTRY/REPO:TAG",
               "poll this registry tag for new revisions (else STORAGE/config/pull.json)"),
    "--pull-interval": (float, "SECONDS", "seconds between polls"),
    "--pull-plain-http": ("flag", "", "the registry speaks HTTP"),
    "--commit-delay": (float, "SECONDS", "seconds all goals must hold before an update commits"),
    "--commit-timeout": (float, "SECONDS", "seconds an update may take to meet its goals"),
    "--board": (str, "FILE", "board mode (the image's /init): modules, storage, network and "
                "the boot choice from this board file and /proc/cmdline"),
    "--log-level": (str, "LEVEL", "debug, info, warning or error (default $PVPY_LOG_LEVEL, info)"),
}  # fmt: skip


def parse_options(argv: list[str]) -> tuple[Options, list[str]]:
    """``--flag``, ``--name VALUE`` and ``--name=VALUE`` into Options.

    Returns the options and the problems found (unknown flag, missing or bad
    value); a flag with a problem keeps its default. PID 1 logs the problems
    and boots anyway: refusing to start would panic the kernel.
    """
    opts = Options()
    problems: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        name, has_value, value = word.partition("=")
        if name not in OPTIONS:
            problems.append(f"unknown argument {word!r}")
            continue
        kind = OPTIONS[name][0]
        attr = name[2:].replace("-", "_")
        if kind == "flag":
            if has_value:
                problems.append(f"{name} takes no value")
            else:
                setattr(opts, attr, True)
            continue
        if not has_value:
            if i == len(argv):
                problems.append(f"{name} needs a value")
                continue
            value = argv[i]
            i += 1
        try:
            if isinstance(kind, tuple):
                if value not in kind:
                    raise ValueError(f"one of {', '.join(kind)}")
                setattr(opts, attr, value)
            elif kind is int:
                setattr(opts, attr, int(value))
            elif kind is float:
                setattr(opts, attr, float(value))
            else:
                setattr(opts, attr, value)
        except ValueError as e:
            problems.append(f"{name} {value!r}: {e}")
    return opts, problems


def usage() -> str:
    rows = [("-h, --help", "show this help and exit")]
    for name, (_kind, metavar, text) in OPTIONS.items():
        default = getattr(Options, name[2:].replace("-", "_"))
        if default not in (None, False):
            text += f" (default {default})"
        rows.append((f"{name} {metavar}" if metavar else name, text))
    width = max(len(flag) for flag, _ in rows) + 2
    lines = ["usage: pvpy init [OPTIONS]", "", "Run as PID 1 (or in the sandbox).", "", "options:"]
    lines += [f"  {flag:<{width}}{text}" for flag, text in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> NoReturn:
    args, problems = parse_options(argv)
    if os.getpid() != 1:
        if "-h" in argv or "--help" in argv:
            sys.stdout.write(usage())
            sys.exit(0)
        for problem in problems:
            sys.stderr.write(f"pvpy init: {problem}\n")
        # Device mode ends in reboot(2): on a workstation that would reboot it.
        sys.stderr.write("pvpy init: not PID 1; use `pvpy device run` for a sandbox\n")
        sys.exit(2)
    configure(lean=True, json=True, level=args.log_level)
    os.environ["PVPY_LOG_JSON"] = "1"  # the helpers it starts log JSON lines too
    for problem in problems:
        log.error("bad argument; going on without it", problem=problem)
    if args.board and not args.sandbox:
        from pvpy.device.board import leave_rootfs

        try:
            leave_rootfs()  # before anything opens a path: crun's pivot_root needs it
        except OSError as e:
            log.error("cannot leave the initramfs rootfs; containers will fail", error=str(e))
    Init(args).run()
