"""The boot: which revision, verified in a child, falling back, then the supervisor.

The boot choice comes from the flags (the sandbox launcher) or, on a board,
from the kernel command line the bootloader wrote (``setup_board``; on a
Raspberry Pi from the tryboot boot env and the firmware's flag). The chosen
revision is verified in a short-lived child (signature, schema, objects: the
heavy crypto never lives in PID 1); when it does not verify, the installed
revisions that once ran well are tried, newest first (``good_fallbacks``).
With nothing runnable PID 1 stays up without containers (the control socket
stays alive).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from pvpy.device.pid1.children import Done, start_child
from pvpy.device.pid1.loop import Loop
from pvpy.device.pid1.mounts import Mounts
from pvpy.device.pid1.options import Options
from pvpy.log import get_logger

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from pvpy.device.board import BoardConfig, BootArgs
    from pvpy.device.bootenv import BootEnv
    from pvpy.device.supervisor import Supervisor
    from pvpy.store import Storage

log = get_logger("init")


class Boot:
    """What was chosen to boot, what runs, and the walk through the candidates."""

    def __init__(
        self,
        options: Options,
        loop: Loop,
        *,
        on_booted: Callable[[int | None], None],
        on_device_request: Callable[[str, str], None],
    ) -> None:
        self.options = options
        self.loop = loop
        self.storage = Path(options.storage)
        self.run_dir = Path(options.run_dir)
        self.on_booted = on_booted  # the revision now running (None: none can), before it starts
        self.on_device_request = on_device_request
        # the boot choice: the flags', or the board's (setup_board)
        self.boot_revision = options.boot_revision
        self.trying = options.trying
        self.failed_try = options.failed_try
        self.failed_try_reason: str | None = None  # why the boot env says failed_try failed
        # what a board set up (the Pi's tryboot boot env lives on its config partition)
        self.board_config: BoardConfig | None = None
        self.board_bootenv: BootEnv | None = None
        self.storage_device: str | None = None
        # what runs
        self.bootenv: BootEnv | None = None
        self.supervisor: Supervisor | None = None
        self.revision: int | None = None
        self.boot_error: str | None = None
        self.candidates: list[int] = []

    # -- on a board -----------------------------------------------------------------

    def setup_board(self, board_file: str, mounts: Mounts) -> BoardConfig:
        """On a board (``--board``): modules, storage, network, the boot choice.

        The sandbox launcher passes the boot choice as flags; on a board the
        bootloader passes it on the kernel command line (boards/*/boot.cmd).
        """
        from pvpy.device import board

        config = board.load(Path(board_file))
        self.board_config = config
        choice = board.boot_choice(Path("/proc/cmdline").read_text())
        board.load_modules(config)
        self.storage_device = board.mount_storage(config, self.storage, choice.storage)
        mounts.adopt(str(self.storage))
        board.setup_network(config)
        if config.rpi:
            choice = self._setup_rpi(config, choice, mounts)
        if self.boot_revision is None:
            self.boot_revision = choice.revision
            self.trying = choice.trying
            self.failed_try = choice.failed_try
        log.info("boot choice", revision=choice.revision, trying=choice.trying,
                 failed_try=choice.failed_try)  # fmt: skip
        return config

    def _setup_rpi(self, config: BoardConfig, cmdline: BootArgs, mounts: Mounts) -> BootArgs:
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
        mounts.adopt(rpi.RPI_CONFIG_DIR)
        self.board_bootenv = env
        try:
            choice, self.failed_try_reason = rpi.rpi_boot_choice(env, cmdline)
        except PvpyError as e:
            log.error("rpi boot choice unreadable; booting the cmdline's", error=str(e))
            return cmdline
        return choice

    # -- children ---------------------------------------------------------------------

    def start_verify(self, revision: int, done: Done) -> None:
        """Verify an installed revision in a child process; ``done(revision, problem)``
        runs from the loop when it exits (problem None when good).

        The crypto and the hashing of every object happen there, never in
        PID 1, and the loop keeps running meanwhile (signals, watchdog, API).
        """
        argv = [sys.executable, "-m", "pvpy", "device", "verify-installed",
                "--storage", str(self.storage), "--revision", str(revision)]  # fmt: skip
        start_child(self.loop, argv, revision, done)

    def start_write_boot(self, revision: int, done: Done) -> None:
        """Write ``revision``'s boot files into the try boot partition, in a child
        (the copying and hashing stay out of PID 1; the loop keeps running)."""
        from pvpy.device.board import rpi

        target = None
        if self.board_config is not None and self.board_bootenv is not None:
            target = rpi.rpi_try_partition(self.board_config, self.board_bootenv,
                                           self.storage_device or "")  # fmt: skip
        if target is None:
            done(revision, "the try boot partition was not found")
            return
        argv = [sys.executable, "-m", "pvpy", "device", "write-boot", "--storage",
                str(self.storage), "--revision", str(revision), "--target", target,
                "--board", str(self.options.board)]  # fmt: skip
        start_child(self.loop, argv, revision, done)

    # -- the walk ------------------------------------------------------------------------

    def prepare(self) -> None:
        """Clear what a power cut left half-written in the storage; open the boot env."""
        from pvpy.store import Storage

        Storage(self.storage).clean_temp()
        self.bootenv = self._open_bootenv()

    def start(self) -> None:
        """Start verifying the boot candidates, one after the other (see ``_verified``)."""
        self.candidates = self._candidates()
        self._next()

    def _open_bootenv(self) -> BootEnv:
        from pvpy.device.bootenv import open_bootenv

        if self.board_bootenv is not None and not self.options.bootenv:
            return self.board_bootenv
        return open_bootenv(self.options.bootenv or f"file:{self.storage / 'bootenv'}")

    def _candidates(self) -> list[int]:
        """The boot revision first, then the older fallbacks that once ran well,
        newest first (``good_fallbacks``)."""
        from pvpy.bootvars import BootVars
        from pvpy.store import Storage

        committed = None
        if self.bootenv is not None:
            try:
                committed = BootVars.parse(self.bootenv.read()).rev
            except Exception as e:  # an unreadable boot env: no committed revision known
                log.error("boot env unreadable for the fallbacks", error=str(e))
        boot = self.boot_revision
        others = [r for r in good_fallbacks(Storage(self.storage), committed) if r != boot]
        return [boot, *others] if boot is not None else others

    def _next(self) -> None:
        if not self.candidates:
            log.error("no revision can run; staying up without containers", reason=self.boot_error)
            self.on_booted(None)
            return
        self.start_verify(self.candidates.pop(0), self._verified)

    def _verified(self, revision: int, problem: str | None) -> None:
        from pvpy.device.runtime import Paths, Runtime
        from pvpy.device.supervisor import Supervisor
        from pvpy.state import canonical
        from pvpy.state.model import State
        from pvpy.store import Storage

        if problem is not None:
            log.error("revision refused", revision=revision, reason=problem)
            self.boot_error = f"revision {revision}: {problem}"
            self._next()
            return
        state_bytes, _ = Storage(self.storage).read_trail(revision)
        state = State.from_dict(canonical.decode(state_bytes))
        paths = Paths(storage=self.storage, run=self.run_dir)
        cgroup_parent = "pvpy" if not self.options.sandbox else f"pvpy-{self.run_dir.name}"
        runtime = Runtime(paths, self.options.runtime, cgroup_parent=cgroup_parent)
        self.supervisor = Supervisor(state, runtime, on_device_request=self.on_device_request)
        self.revision = revision
        log.info("booting revision", revision=revision, trying=self.trying)
        self.on_booted(revision)
        self.supervisor.start()


def good_fallbacks(storage: Storage, committed: int | None) -> list[int]:
    """Installed revisions PID 1 may fall back to, newest first: the committed one
    (``pv_rev``, whatever its record says: a power cut can leave it unfinished),
    those whose record says they committed (DONE, UPDATED), and those that never
    had a record (the factory revision). Never one that failed (ERROR), was
    refused (WONTGO) or never committed (a staged or tested revision): when the
    committed revision is corrupt, a newer revision that failed must not run.

    Reads only the records of installed revisions (not every record stored).
    """
    from pvpy.device import update as up

    good = []
    for revision in storage.revisions():
        record = up.read_progress(storage.root, revision)
        if revision == committed or record is None or record.status in (up.DONE, up.UPDATED):
            good.append(revision)
    return sorted(good, reverse=True)
