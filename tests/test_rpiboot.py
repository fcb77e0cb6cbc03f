"""The Raspberry Pi update flows on the device (pvpy.rpiboot, pvpy.device.board, pvpy.device.apply).

U-Boot (boards rpi3, rpi4; ``UBootPi``): PID 1's half against the FAT partition's
uboot.env and pvrev.env, with the boot script's choice on the command line as U-Boot
writes it (U-Boot itself runs in tests/test_rpi_qemu.py, on QEMU's raspi3b).

Tryboot (boards rpi4-tryboot, rpi5). No Pi and no Pi firmware here: directories stand in for the SD card's
partitions (``disk/p1`` config, ``p2``/``p3`` boot A/B, ``p4`` the storage)
and a directory of files for /proc/device-tree/chosen/bootloader (the
firmware's ``tryboot`` and ``partition`` cells) — the one thing faked. PID 1's
update code (``Applier``) runs for real against them, with a small stand-in
for PID 1 (``FakePid1``, an ``ApplyHost``) whose child process is the real
``pvpy device write-boot``.
A real FAT partition is written once too (loop device, root only).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pytest

from pvpy import rpiboot
from pvpy.device import board
from pvpy.device import update as up
from pvpy.device.apply import Applier
from pvpy.device.board import rpi
from pvpy.device.bootenv.file import FileBootEnv
from pvpy.device.bootenv.rpi import NOT_TRYBOOTED, TRYBOOT_ARGUMENT
from pvpy.errors import DeviceError
from pvpy.rpiboot import AUTOBOOT, autoboot_text
from pvpy.signing import SigningKey
from pvpy.state import canonical
from pvpy.state.model import State
from pvpy.store import ObjectStore, Storage
from pvpy.workstation.image import load_board, rpi_boot_files
from tests.conftest import write_revision

if TYPE_CHECKING:
    from pvpy.device._apply_host import ApplyHost, Done

REPO = Path(__file__).resolve().parent.parent
RPI = {"config_partition": 1, "boot_partitions": [2, 3], "console": "ttyS1,115200",
       "config_txt": ["arm_64bit=1", "upstream_kernel=1"], "dtb": "bcm2711-rpi-4-b.dtb"}  # fmt: skip
FIRMWARE = {"start4.elf": b"gpu firmware", "fixup4.dat": b"fixup"}


class FakePid1:
    """PID 1 as ``Applier`` sees it (``ApplyHost``): storage, boot env, the boot facts,
    the running state, and the ways out (a child process, a reboot request)."""

    def __init__(self, storage: Path, bootenv: Any, running: State, board_file: Path | None = None,
                 target: Path | None = None, *, trying: bool = False,
                 failed_try: int | None = None) -> None:  # fmt: skip
        self.storage = storage
        self.bootenv = bootenv
        self.supervisor: Any = SimpleNamespace(state=running)  # only its state is read here
        self.boot_revision: int | None = running.revision
        self.boot_trying = trying
        self.failed_try = failed_try
        self.failed_try_reason: str | None = None
        self.commit_delay = 0.0
        self.commit_timeout = 60.0
        self.revision: int | None = running.revision
        self.board = str(board_file)
        self.target = target
        self.requests: list[tuple[str, str, str | None]] = []

    @property
    def shutdown_pending(self) -> bool:
        return bool(self.requests)

    def set_revision(self, revision: int) -> None:
        self.revision = revision

    def start_verify(self, revision: int, done: Done) -> None:
        raise AssertionError("these tests start at the verified revision")

    def start_write_boot(self, revision: int, done: Done) -> None:
        """PID 1 spawns this child and hears of its exit in its loop; here at once."""
        proc = subprocess.run(
            [sys.executable, "-m", "pvpy", "device", "write-boot", "--storage", str(self.storage),
             "--revision", str(revision), "--target", str(self.target), "--board", self.board],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        lines = proc.stderr.strip().splitlines()
        done(revision, None if proc.returncode == 0 else lines[-1] if lines else "failed")

    def request(self, action: str, reason: str, argument: str | None = None) -> None:
        self.requests.append((action, reason, argument))


if TYPE_CHECKING:
    _: type[ApplyHost] = FakePid1  # mypy: the fake offers all the protocol asks


class Pi:
    """An SD card of directories, the firmware's device-tree flag, revisions 1 and 2."""

    def __init__(self, tmp: Path, key: SigningKey) -> None:
        self.disk = tmp / "disk"
        self.dt = tmp / "dt"
        self.dt.mkdir()
        for n in (1, 2, 3):
            (self.disk / f"p{n}").mkdir(parents=True)
        self.store = Storage(self.disk / "p4").ensure()
        self.revs: dict[int, Path] = {}
        for number, initrd in ((1, b"initrd one"), (2, b"initrd two, bigger")):
            rev = tmp / f"rev{number}"
            objects = ObjectStore(rev / "objects").ensure()
            bsp: dict[str, Any] = {"cmdline": "quiet"}
            for part, data in (("kernel", b"kernel"), ("initrd", initrd), ("dtb", b"dtb")):
                bsp[part] = {"sha256": objects.put_bytes(data), "size": len(data)}
            write_revision(rev, number, [key], blobs={"app": b"app"}, bsp=bsp)
            for obj in (rev / "objects").iterdir():
                if not obj.name.startswith("."):
                    self.store.objects.put_file(obj, expected=obj.name)
            self.store.install_revision(number, (rev / "state.json").read_bytes(),
                                        (rev / "state.sig.json").read_bytes())  # fmt: skip
            self.revs[number] = rev
        self.board_file = tmp / "board.json"
        self.board_file.write_text(
            json.dumps(board.BoardConfig(name="rpi-test", rpi=RPI).to_dict())
        )
        # The factory image: revision 1 in A and B, firmware in both, pv_rev=1 on A.
        for n in (2, 3):
            for name, data in FIRMWARE.items():
                (self.disk / f"p{n}" / name).write_bytes(data)
            rpi.write_files(self.disk / f"p{n}", self.files(1))
        self.firmware(partition=2, tryboot=False)
        self.env().write({"pv_rev": "1"})

    def files(self, revision: int) -> dict[str, Path | bytes]:
        state = canonical.decode((self.revs[revision] / "state.json").read_bytes())
        return rpiboot.boot_files(state, self.store.objects.root, RPI["config_txt"],
                                  RPI["console"], RPI["dtb"])  # fmt: skip

    def firmware(self, partition: int, tryboot: bool) -> None:
        """What the firmware reports in /proc/device-tree/chosen/bootloader (faked)."""
        (self.dt / "tryboot").write_bytes(struct.pack(">I", int(tryboot)))
        (self.dt / "partition").write_bytes(struct.pack(">I", partition))

    def env(self) -> Any:
        config = board.BoardConfig(name="rpi-test", rpi=RPI)
        return rpi.open_rpi_bootenv(config, str(self.disk / "p4"), "/nonexistent", self.dt)

    def state(self, revision: int) -> State:
        return State.from_dict(canonical.decode((self.revs[revision] / "state.json").read_bytes()))

    def snapshot(self, n: int) -> dict[str, bytes]:
        part = self.disk / f"p{n}"
        return {p.name: p.read_bytes() for p in sorted(part.iterdir())}

    def boot(self) -> tuple[FakePid1, Applier]:
        """What PID 1 does on the next boot: the choice from pvpy.env + the flag,
        checked against the booted partition's cmdline.txt, then reconcile."""
        env = self.env()
        booted = struct.unpack(">I", (self.dt / "partition").read_bytes())[0]
        cmdline = (self.disk / f"p{booted}" / rpiboot.CMDLINE).read_text()
        choice, reason = rpi.rpi_boot_choice(env, board.boot_choice(cmdline))
        init = FakePid1(self.store.root, env, self.state(choice.revision or 1),
                        self.board_file, trying=choice.trying, failed_try=choice.failed_try)  # fmt: skip
        init.failed_try_reason = reason
        applier = Applier(init)
        applier.reconcile(choice.revision)
        return init, applier

    def update_to_2(self) -> FakePid1:
        """PID 1 applies revision 2 (a BSP change: a new initrd) from revision 1."""
        init = FakePid1(self.store.root, self.env(), self.state(1), self.board_file,
                        target=self.disk / "p3")  # fmt: skip
        Applier(init).verified(2, None)
        return init


@pytest.fixture
def pi(tmp_path: Path, key: SigningKey) -> Pi:
    return Pi(tmp_path, key)


def record(pi: Pi | UBootPi, revision: int) -> up.Progress:
    progress = up.read_progress(pi.store.root, revision)
    assert progress is not None
    return progress


def test_device_lays_out_what_the_image_build_does(pi: Pi, tmp_path: Path) -> None:
    """One set of functions for both sides: the factory partition and an update's."""
    rpi4 = load_board("rpi4-tryboot")
    firmware = tmp_path / "fw"
    fw = rpi4.get("bootloader", "firmware")
    (firmware / fw["dir"]).mkdir(parents=True)
    for name in fw["files"]:
        (firmware / fw["dir"] / name).write_bytes(b"fw")
    built = rpi_boot_files(rpi4, pi.revs[2], firmware)
    config = rpi4.device_config()["rpi"]
    assert config == {"config_partition": 1, "boot_partitions": [2, 3],
                      "config_txt": rpi4.get("bootloader", "config"),
                      "console": rpi4.get("console"), "dtb": "bcm2711-rpi-4-b.dtb"}  # fmt: skip
    state = canonical.decode((pi.revs[2] / "state.json").read_bytes())
    device = rpiboot.boot_files(state, pi.revs[2] / "objects", config["config_txt"],
                                config["console"], config["dtb"])  # fmt: skip
    assert {k: v for k, v in built.items() if k not in fw["files"]} == device
    assert board.BoardConfig.from_dict(rpi4.device_config()).rpi == config


def test_board_module_lists_can_mount_the_fat_partitions() -> None:
    """vfat (fat comes as its dependency), nls_cp437 (FAT's default codepage) and
    nls_ascii (bookworm's CONFIG_FAT_DEFAULT_IOCHARSET): no modprobe loads them later."""
    for name in ("rpi3", "rpi4", "rpi4-tryboot", "rpi5"):
        modules = load_board(name).get("modules")
        assert {"vfat", "nls_cp437", "nls_ascii"} <= set(modules), name


def test_bsp_update_writes_the_try_partition_then_pv_try_then_tryboot(pi: Pi) -> None:
    committed, config = pi.snapshot(2), pi.snapshot(1)
    init = pi.update_to_2()
    assert init.requests == [("reboot", "update to revision 2", TRYBOOT_ARGUMENT)]
    assert init.bootenv.read()["pv_try"] == "2"
    assert pi.snapshot(2) == committed  # A: untouched
    assert (pi.disk / "p1" / AUTOBOOT).read_bytes() == config[AUTOBOOT]  # still A
    b = pi.snapshot(3)
    assert b[rpiboot.INITRD] == b"initrd two, bigger"
    assert b[rpiboot.CMDLINE] == b"console=ttyS1,115200 quiet pv_rev=2\n"
    assert b"device_tree=bcm2711-rpi-4-b.dtb" in b[rpiboot.CONFIG]
    assert {k: b[k] for k in FIRMWARE} == FIRMWARE  # the firmware stays
    assert not [n for n in b if n.endswith(".tmp")]
    assert record(pi, 2).status == up.INPROGRESS


def test_firmware_try_boot_then_commit_swaps_autoboot(pi: Pi) -> None:
    pi.update_to_2()
    pi.firmware(partition=3, tryboot=True)  # the Pi kernel passed "0 tryboot" on
    init, applier = pi.boot()
    assert (init.boot_revision, init.boot_trying) == (2, True)
    assert init.bootenv.read()["pv_trying"] == "2"
    assert record(pi, 2).status == up.TESTING
    assert applier.update is not None and applier.trying
    applier.commit(applier.update)
    assert (pi.disk / "p1" / AUTOBOOT).read_text() == autoboot_text(3, 2)
    assert init.bootenv.read() == {"pv_rev": "2", "rpi_boot_partition": "3"}
    assert record(pi, 2).status == up.DONE
    # The next update goes to A, the partition that is no longer committed.
    assert rpi.rpi_try_partition(board.BoardConfig(name="t", rpi=RPI), init.bootenv,
                                   str(pi.disk / "p4")) == str(pi.disk / "p2")  # fmt: skip


def test_no_tryboot_flag_is_error_and_clears_pv_try(pi: Pi) -> None:
    """The kernel could not pass "0 tryboot" (Debian's, QEMU): the firmware booted A."""
    autoboot, committed = (pi.disk / "p1" / AUTOBOOT).read_bytes(), pi.snapshot(2)
    pi.update_to_2()
    pi.firmware(partition=2, tryboot=False)
    init, applier = pi.boot()
    assert (init.boot_revision, init.boot_trying, init.failed_try) == (1, False, 2)
    assert (record(pi, 2).status, record(pi, 2).reason) == (up.ERROR, NOT_TRYBOOTED)
    assert "pv_try" not in init.bootenv.read() and applier.update is None
    assert (pi.disk / "p1" / AUTOBOOT).read_bytes() == autoboot
    assert pi.snapshot(2) == committed
    # A later boot changes nothing more.
    pi.boot()
    assert record(pi, 2).reason == NOT_TRYBOOTED


def test_a_try_that_booted_and_died_is_error(pi: Pi) -> None:
    """Try-booted (pv_trying written), then a crash or the watchdog: flag gone."""
    pi.update_to_2()
    pi.firmware(partition=3, tryboot=True)
    pi.boot()
    pi.firmware(partition=2, tryboot=False)
    init, _ = pi.boot()
    assert init.failed_try == 2 and init.failed_try_reason is None
    assert record(pi, 2).status == up.ERROR and "did not commit" in record(pi, 2).reason
    assert init.bootenv.read() == {"pv_rev": "1", "rpi_boot_partition": "2"}


def test_try_partition_holding_other_files_is_not_tested(pi: Pi) -> None:
    """The flag says the try booted, but the partition's cmdline.txt names another
    revision: the try fails and the committed revision runs."""
    pi.update_to_2()
    rpi.write_files(pi.disk / "p3", pi.files(1))
    pi.firmware(partition=3, tryboot=True)
    init, _ = pi.boot()
    assert (init.boot_revision, init.boot_trying, init.failed_try) == (1, False, 2)
    assert "holds revision 1's boot files" in record(pi, 2).reason


@pytest.mark.parametrize("cut_after", range(6))
def test_power_cut_while_writing_the_try_partition(pi: Pi, cut_after: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Cut after 0..4 of the five files, or after all of them before pv_try: A and
    autoboot.txt are untouched, no pv_try was set, the next boot runs revision 1
    and the record says interrupted."""
    committed, config = pi.snapshot(2), pi.snapshot(1)
    written: list[str] = []
    real = rpi._write_file

    def cut(path: Path, content: Path | bytes) -> None:
        if len(written) == cut_after:
            raise SystemExit("power cut")  # nothing after this point runs
        real(path, content)
        written.append(path.name)

    monkeypatch.setattr(rpi, "_write_file", cut)
    up.write_progress(pi.store.root, 2, up.INPROGRESS, "writing the try boot partition",
                      kind=up.KIND_REBOOT)  # fmt: skip
    with contextlib.suppress(SystemExit):
        rpi.write_files(pi.disk / "p3", pi.files(2))
    monkeypatch.undo()
    assert len(written) == cut_after
    assert (rpiboot.CONFIG in written) == (cut_after == 5)  # config.txt comes back last
    assert (rpiboot.CONFIG in pi.snapshot(3)) == (cut_after == 5)
    assert pi.snapshot(2) == committed and pi.snapshot(1) == config
    init, _ = pi.boot()
    assert (init.boot_revision, init.boot_trying, init.failed_try) == (1, False, None)
    assert record(pi, 2).status == up.ERROR and "interrupted" in record(pi, 2).reason
    # The next attempt writes the partition whole.
    init = pi.update_to_2()
    assert init.requests[-1][2] == TRYBOOT_ARGUMENT
    assert pi.snapshot(3)[rpiboot.CMDLINE].endswith(b"pv_rev=2\n")


def test_power_cut_after_pv_try_before_the_reboot(pi: Pi, monkeypatch: pytest.MonkeyPatch) -> None:
    def persist_point(name: str) -> None:
        if name == "reboot:try":
            raise SystemExit("power cut")

    monkeypatch.setattr(up, "persist_point", persist_point)
    with pytest.raises(SystemExit):
        pi.update_to_2()
    monkeypatch.undo()
    pi.firmware(partition=2, tryboot=False)  # a plain power-on: no flag
    init, _ = pi.boot()
    assert init.boot_revision == 1 and record(pi, 2).status == up.ERROR
    assert "pv_try" not in init.bootenv.read()


def test_write_failure_is_error_without_pv_try(pi: Pi) -> None:
    """A corrupt object never becomes a kernel: the child refuses, ERROR, no reboot."""
    state = canonical.decode((pi.revs[2] / "state.json").read_bytes())
    obj = pi.store.objects.root / state["bsp"]["initrd"]["sha256"]
    os.chmod(obj, 0o644)
    obj.write_bytes(b"tampered")
    init = pi.update_to_2()
    assert init.requests == [] and "pv_try" not in init.bootenv.read()
    assert record(pi, 2).status == up.ERROR and "corrupt" in record(pi, 2).reason


def test_write_boot_partition_on_a_real_fat_partition(pi: Pi, tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("mkfs.vfat") is None:
        pytest.skip("needs root (loop device, mount) and dosfstools")
    image = tmp_path / "boot.img"
    subprocess.run(["mkfs.vfat", "-C", "-F", "32", "-n", "PVBOOTB", str(image), "40960"],
                   check=True, capture_output=True)  # fmt: skip
    loop = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    try:
        try:
            rpi.write_boot_partition(loop, pi.files(2), tmp_path / "mnt")
        except DeviceError as e:
            if "No such device" in str(e):
                pytest.skip(f"no vfat in this kernel: {e}")
            raise
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
    env = {"MTOOLS_SKIP_CHECK": "1", "PATH": os.environ["PATH"]}
    out = subprocess.run(["mcopy", "-n", "-i", str(image), f"::/{rpiboot.CMDLINE}", "-"],
                         check=True, capture_output=True, env=env).stdout  # fmt: skip
    assert out == b"console=ttyS1,115200 quiet pv_rev=2\n"
    assert not os.path.ismount(tmp_path / "mnt")


def test_reconcile_clears_a_try_the_bootloader_never_booted(
    tmp_path: Path, key: SigningKey
) -> None:
    """Any board (here the file boot env of the sandbox and U-Boot boards' storage):
    pv_try set, then a plain reboot into the committed revision. The try is over:
    ERROR, and pv_try cleared (it used to stay set)."""
    rev = write_revision(tmp_path / "rev1", 1, [key])
    running = State.from_dict(canonical.decode((rev / "state.json").read_bytes()))
    storage = tmp_path / "storage"
    storage.mkdir()
    env = FileBootEnv(storage / "bootenv")
    env.write({"pv_rev": "1", "pv_try": "2", "pv_bootcount": "0"})
    up.write_progress(storage, 2, up.INPROGRESS, "BSP changed: rebooting into it",
                      kind=up.KIND_REBOOT)  # fmt: skip
    Applier(FakePid1(storage, env, running)).reconcile(1)
    progress = up.read_progress(storage, 2)
    assert progress is not None and progress.status == up.ERROR
    assert "did not boot it" in progress.reason
    assert env.read() == {"pv_rev": "1"}


# -- U-Boot (rpi3, rpi4): uboot.env on the FAT partition --------------------------------------

U_BOOT_DEFAULTS = {"bootcmd": "run distro_bootcmd", "bootdelay": "0", "board": "rpi"}


class UBootPi:
    """An SD card of directories as a U-Boot Pi image has it: p1 the FAT partition
    (uboot.env with U-Boot's defaults and pv_rev=1, u-boot-initial-env, pvrev.env),
    p2 the storage with revisions 1 and 2 (2: a new initrd)."""

    def __init__(self, tmp: Path, key: SigningKey) -> None:
        from pvpy.device.bootenv.uboot import UBootEnv

        self.fat = tmp / "disk" / "p1"
        self.fat.mkdir(parents=True)
        self.store = Storage(tmp / "disk" / "p2").ensure()
        self.revs: dict[int, Path] = {}
        for number, initrd in ((1, b"initrd one"), (2, b"initrd two")):
            rev = tmp / f"rev{number}"
            objects = ObjectStore(rev / "objects").ensure()
            bsp: dict[str, Any] = {"cmdline": "quiet"}
            for part, data in (("kernel", b"kernel"), ("initrd", initrd), ("dtb", b"dtb")):
                bsp[part] = {"sha256": objects.put_bytes(data), "size": len(data)}
            write_revision(rev, number, [key], blobs={"app": b"app"}, bsp=bsp)
            for obj in (rev / "objects").iterdir():
                if not obj.name.startswith("."):
                    self.store.objects.put_file(obj, expected=obj.name)
            self.store.install_revision(number, (rev / "state.json").read_bytes(),
                                        (rev / "state.sig.json").read_bytes())  # fmt: skip
            self.revs[number] = rev
        (self.fat / rpiboot.UBOOT_DEFAULTS).write_text(
            "".join(f"{k}={v}\n" for k, v in U_BOOT_DEFAULTS.items()))  # fmt: skip
        env = UBootEnv(self.fat / rpiboot.UBOOT_ENV, rpiboot.UBOOT_ENV_SIZE,
                       defaults=U_BOOT_DEFAULTS, lockfile=None)  # fmt: skip
        env.path.write_bytes(bytes(rpiboot.UBOOT_ENV_SIZE))
        env.write({"pv_rev": "1"})
        (self.fat / rpiboot.COMMITTED).write_text(rpiboot.committed_text(1))
        self.config = board.BoardConfig.from_dict(load_board("rpi3").device_config())

    def env(self) -> Any:
        return rpi.open_rpi_bootenv(self.config, str(self.store.root), "/nonexistent")

    def state(self, revision: int) -> State:
        return State.from_dict(canonical.decode((self.revs[revision] / "state.json").read_bytes()))

    def u_boot(self) -> str:
        """What boards/qemu-arm64/boot.cmd decides from uboot.env, as the command line
        it writes (the script itself runs on QEMU's raspi3b: tests/test_rpi_qemu.py)."""
        from pvpy.device.bootenv.uboot import UBootEnv

        env = UBootEnv(self.fat / rpiboot.UBOOT_ENV, rpiboot.UBOOT_ENV_SIZE, lockfile=None)
        values = env.read()
        if env.was_corrupt:  # U-Boot's defaults: no pv_rev, no try; pvrev.env's revision
            return (self.fat / rpiboot.COMMITTED).read_text().strip()
        rev, try_, trying = values["pv_rev"], values.get("pv_try"), values.get("pv_trying", "0")
        if not try_ or try_ == rev:
            return f"pv_rev={rev}"
        if trying == try_:
            return f"pv_rev={rev} pv_failed_try={try_}"
        env.write({"pv_trying": try_})  # saveenv
        return f"pv_rev={try_} pv_trying=1"

    def boot(self) -> tuple[FakePid1, Applier]:
        env = self.env()
        choice, reason = rpi.rpi_boot_choice(env, board.boot_choice(self.u_boot()))
        assert reason is None
        init = FakePid1(self.store.root, env, self.state(choice.revision or 1),
                        trying=choice.trying, failed_try=choice.failed_try)  # fmt: skip
        applier = Applier(init)
        applier.reconcile(choice.revision)
        return init, applier


@pytest.fixture
def upi(tmp_path: Path, key: SigningKey) -> UBootPi:
    return UBootPi(tmp_path, key)


def test_uboot_board_opens_uboot_env_on_the_fat_partition(upi: UBootPi) -> None:
    from pvpy.device.bootenv.ubootfat import UBootFatEnv

    assert upi.config.rpi == {"boot": "u-boot", "config_partition": 1}
    (upi.fat / ".uboot.env.x1.tmp").write_bytes(b"a write a power cut left")
    env = upi.env()
    assert isinstance(env, UBootFatEnv) and env.read()["pv_rev"] == "1"
    assert not (upi.fat / ".uboot.env.x1.tmp").exists()
    assert env.try_reboot_argument() is None and not env.writes_try_partition()


def test_uboot_bsp_update_tries_through_u_boot_and_commits(upi: UBootPi) -> None:
    """A BSP change: pv_try in uboot.env, a plain reboot (no tryboot argument, no
    partition written); U-Boot marks and boots the try; PID 1 commits: pv_rev in
    uboot.env, then pvrev.env."""
    init = FakePid1(upi.store.root, upi.env(), upi.state(1))
    Applier(init).verified(2, None)
    assert init.requests == [("reboot", "update to revision 2", None)]
    assert init.bootenv.read()["pv_try"] == "2" and init.bootenv.committed() == 1
    init, applier = upi.boot()
    assert (init.boot_revision, init.boot_trying) == (2, True)
    assert record(upi, 2).status == up.TESTING
    assert applier.update is not None
    applier.commit(applier.update)
    values = init.bootenv.read()
    assert values["pv_rev"] == "2" and "pv_try" not in values and "pv_trying" not in values
    assert values["bootcmd"] == "run distro_bootcmd"  # U-Boot's own variables kept
    assert (upi.fat / rpiboot.COMMITTED).read_text() == "pv_rev=2\n"
    assert record(upi, 2).status == up.DONE
    assert upi.u_boot() == "pv_rev=2"  # the next boot: the committed revision


def test_uboot_try_that_never_reached_pid1_is_error(upi: UBootPi) -> None:
    """The try booted (marker written) and died before PID 1: U-Boot falls back with
    pv_failed_try; PID 1 records ERROR and clears the try; pvrev.env stays."""
    init = FakePid1(upi.store.root, upi.env(), upi.state(1))
    Applier(init).verified(2, None)
    assert upi.u_boot() == "pv_rev=2 pv_trying=1"  # ... and the kernel panics
    init, _ = upi.boot()
    assert (init.boot_revision, init.boot_trying, init.failed_try) == (1, False, 2)
    assert record(upi, 2).status == up.ERROR
    assert "pv_try" not in init.bootenv.read() and init.bootenv.committed() == 1


def test_uboot_env_torn_by_u_boot_boots_the_committed_revision(upi: UBootPi) -> None:
    """The power went while U-Boot's saveenv wrote the marker: uboot.env is torn,
    U-Boot runs on its defaults and boots pvrev.env's revision; PID 1 reads the same,
    reports the forgotten try ERROR, and its next write makes uboot.env whole again."""
    init = FakePid1(upi.store.root, upi.env(), upi.state(1))
    Applier(init).verified(2, None)
    data = bytearray((upi.fat / rpiboot.UBOOT_ENV).read_bytes())
    data[: len(data) // 2] = bytes(len(data) // 2)  # half of saveenv's bytes made it
    (upi.fat / rpiboot.UBOOT_ENV).write_bytes(bytes(data))
    assert upi.u_boot() == "pv_rev=1"
    init, _ = upi.boot()
    assert (init.boot_revision, init.boot_trying, init.failed_try) == (1, False, None)
    assert record(upi, 2).status == up.ERROR
    assert init.bootenv.read() == {**U_BOOT_DEFAULTS, "pv_rev": "1"}
    # The next update's write starts a good uboot.env from U-Boot's defaults.
    init.bootenv.write({"pv_try": "3", "pv_bootcount": "0"})
    assert not init.bootenv.was_corrupt
    assert init.bootenv.read() == {**U_BOOT_DEFAULTS, "pv_rev": "1", "pv_try": "3",
                                   "pv_bootcount": "0"}  # fmt: skip
