"""Boot environment backends against the real tools: fw_printenv/fw_setenv, grub-editenv.

Every format claim is checked both ways with Debian's tools (libubootenv-tool,
grub-common; tools/setup installs them). The Raspberry Pi has no tool to check
against: only its device-tree flags are faked (see ``fake_dt``).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from pvpy.device.bootenv import BootEnv, BootEnvError, choose_boot, open_bootenv
from pvpy.device.bootenv import uboot as uboot_mod
from pvpy.device.bootenv.file import FileBootEnv
from pvpy.device.bootenv.grub import SIZE as GRUB_SIZE
from pvpy.device.bootenv.grub import GrubEnv
from pvpy.device.bootenv.rpi import RpiTryboot
from pvpy.device.bootenv.uboot import UBootEnv
from pvpy.device.bootenv.ubootfat import UBootFatEnv
from pvpy.rpiboot import AUTOBOOT_MAX, COMMITTED, UBOOT_DEFAULTS, UBOOT_ENV, UBOOT_ENV_SIZE

needs_fw = pytest.mark.skipif(
    not (shutil.which("fw_printenv") and shutil.which("fw_setenv")),
    reason="install libubootenv-tool (tools/setup)",
)
needs_grub = pytest.mark.skipif(
    not shutil.which("grub-editenv"), reason="install grub-common (tools/setup)"
)

SIZE = 0x4000  # small copies keep the tests quick; the format does not depend on it
BASE = {"bootcmd": "run pv_boot", "bootdelay": "1"}


# --- helpers -------------------------------------------------------------------------------


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)


def fw_config(env: UBootEnv, tmp_path: Path) -> Path:
    config = tmp_path / "fw_env.config"
    config.write_text(env.fw_env_config())
    return config


def fw_printenv(config: Path) -> dict[str, str]:
    result = run("fw_printenv", "-c", config)
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines())


def fw_setenv_script(config: Path, tmp_path: Path, lines: list[str]) -> None:
    # libubootenv's -s takes name=value lines (empty value unsets), not U-Boot's
    # older "name value".
    script = tmp_path / "script.txt"
    script.write_text("".join(f"{line}\n" for line in lines))
    result = run("fw_setenv", "-c", config, "-s", script)
    assert result.returncode == 0, result.stderr


def blank(path: Path, size: int, fill: int = 0) -> Path:
    path.write_bytes(bytes([fill]) * size)
    return path


Defaults = Mapping[str, str] | Path | None


def single(tmp_path: Path, defaults: Defaults = None) -> UBootEnv:
    path = tmp_path / "uboot.env"
    if not path.exists():
        blank(path, SIZE)
    return UBootEnv(path, SIZE, lockfile=tmp_path / "fw.lock", defaults=defaults)


def redundant(tmp_path: Path, layout: str, defaults: Defaults = None) -> UBootEnv:
    """Two copies: in two files, or at two offsets of one file (as on an eMMC)."""
    lock = tmp_path / "fw.lock"
    if layout == "files":
        a, b = tmp_path / "env-a.bin", tmp_path / "env-b.bin"
        for p in (a, b):
            if not p.exists():
                blank(p, SIZE)
        return UBootEnv(a, SIZE, redundant_path=b, lockfile=lock, defaults=defaults)
    disk = tmp_path / "disk.img"
    if not disk.exists():
        blank(disk, 0x10000)
    return UBootEnv(
        disk, SIZE, offset=0x2000, redundant_offset=0x8000, lockfile=lock, defaults=defaults
    )


def copy_bytes(env: UBootEnv, index: int) -> bytes:
    place = env.places[index]
    with open(place.path, "rb") as f:
        f.seek(place.offset)
        return f.read(env.size)


def poke(env: UBootEnv, index: int, at: int, data: bytes) -> None:
    """Overwrite bytes of one copy in place (what a cut or bit rot would leave)."""
    place = env.places[index]
    with open(place.path, "r+b") as f:
        f.seek(place.offset + at)
        f.write(data)


# --- U-Boot --------------------------------------------------------------------------------


def test_uboot_layout_single_copy(tmp_path: Path) -> None:
    env = single(tmp_path, defaults={})
    env.write({"b": "2", "a": "1", "pv_rev": "7"})
    raw = (tmp_path / "uboot.env").read_bytes()
    assert len(raw) == SIZE
    data = raw[4:]
    assert struct.unpack("<I", raw[:4])[0] == zlib.crc32(data)
    # sorted like U-Boot's export, an empty entry ends it, zero padding after
    assert data.startswith(b"a=1\0b=2\0pv_rev=7\0\0")
    assert data[len(b"a=1\0b=2\0pv_rev=7\0\0") :] == bytes(SIZE - 4 - 18)


def test_uboot_round_trip_and_unset(tmp_path: Path) -> None:
    env = single(tmp_path, defaults=BASE)
    assert env.read() == BASE and env.was_corrupt  # blank flash: U-Boot's defaults
    env.write({"pv_rev": "1", "pv_try": "2", "odd": "x=y ü\nz"})
    assert not env.was_corrupt
    env.write({"pv_try": None, "missing": None})
    assert single(tmp_path).read() == {**BASE, "pv_rev": "1", "odd": "x=y ü\nz"}


def test_uboot_write_over_corrupt_env_needs_defaults(tmp_path: Path) -> None:
    path = blank(tmp_path / "uboot.env", SIZE, 0xFF)  # erased flash
    env = single(tmp_path)
    assert env.read() == {} and env.was_corrupt
    with pytest.raises(BootEnvError, match=r"^uboot: no valid environment"):
        env.write({"pv_rev": "1"})
    assert path.read_bytes() == b"\xff" * SIZE


def test_uboot_too_big_is_refused_and_nothing_written(tmp_path: Path) -> None:
    env = single(tmp_path, defaults={})
    env.write({"pv_rev": "1"})
    before = (tmp_path / "uboot.env").read_bytes()
    with pytest.raises(BootEnvError, match=r"^uboot: environment needs"):
        env.write({"big": "x" * SIZE})
    assert (tmp_path / "uboot.env").read_bytes() == before


@pytest.mark.parametrize(("name", "value"), [("", "1"), ("a=b", "1"), ("a\0", "1"), ("a", "nul\0")])
def test_uboot_invalid_names_and_values(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(BootEnvError, match=r"^uboot: "):
        single(tmp_path, defaults={}).write({name: value})


@needs_fw
def test_uboot_single_interop_both_ways(tmp_path: Path) -> None:
    env = single(tmp_path, defaults=BASE)
    config = fw_config(env, tmp_path)
    env.write({"pv_rev": "3", "pv_try": "4", "spaces": "a b  c"})
    assert fw_printenv(config) == {**BASE, "pv_rev": "3", "pv_try": "4", "spaces": "a b  c"}

    fw_setenv_script(config, tmp_path, ["pv_rev=4", "pv_try=", "pv_bootcount=0", "x=1=2"])
    assert env.read() == {**BASE, "pv_rev": "4", "pv_bootcount": "0", "x": "1=2",
                          "spaces": "a b  c"}  # fmt: skip
    assert not env.was_corrupt

    assert run("fw_setenv", "-c", config, "x").returncode == 0  # unset one
    env.write({"pv_trying": "5", "spaces": None})
    assert fw_printenv(config) == {**BASE, "pv_rev": "4", "pv_bootcount": "0", "pv_trying": "5"}


@needs_fw
def test_uboot_defaults_file_like_fw_setenv_f(tmp_path: Path) -> None:
    defaults = tmp_path / "u-boot-initial-env"
    defaults.write_text("# comment\nbootcmd=run a; run b\nbootdelay=3\nnoequals\nempty=\n")
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    theirs.mkdir()
    ours.mkdir()
    tool_env = single(theirs)
    config = fw_config(tool_env, theirs)
    assert run("fw_setenv", "-c", config, "-f", defaults, "pv_rev", "1").returncode == 0
    single(ours, defaults=defaults).write({"pv_rev": "1"})
    assert fw_printenv(fw_config(single(ours), ours)) == fw_printenv(config)
    assert fw_printenv(config) == {"bootcmd": "run a; run b", "bootdelay": "3", "pv_rev": "1"}


@needs_fw
@pytest.mark.parametrize("layout", ["files", "offsets"])
def test_uboot_redundant_interop_both_ways(tmp_path: Path, layout: str) -> None:
    env = redundant(tmp_path, layout, defaults=BASE)
    config = fw_config(env, tmp_path)
    assert len(config.read_text().splitlines()) == 2

    env.write({"pv_rev": "1"})
    assert env.active_copy == 1  # none was valid: like libubootenv, copy 2 first
    env.write({"pv_try": "2"})
    assert env.active_copy == 0
    assert copy_bytes(env, 0)[4] == copy_bytes(env, 1)[4] + 1  # flags count up
    assert fw_printenv(config) == {**BASE, "pv_rev": "1", "pv_try": "2"}

    # A batch from the tool lands in the other copy; we follow it.
    fw_setenv_script(config, tmp_path, ["pv_trying=2", "pv_bootcount=1", "bootdelay="])
    expected = {"bootcmd": BASE["bootcmd"], "pv_rev": "1", "pv_try": "2", "pv_trying": "2",
                "pv_bootcount": "1"}  # fmt: skip
    assert env.read() == expected
    assert env.active_copy == 1

    env.write({"pv_rev": "2", "pv_try": None, "pv_trying": None, "pv_bootcount": None})
    assert env.active_copy == 0
    assert fw_printenv(config) == {"bootcmd": BASE["bootcmd"], "pv_rev": "2"}


@needs_fw
@pytest.mark.parametrize("layout", ["files", "offsets"])
def test_uboot_bad_crc_in_newest_copy_falls_back_to_older(tmp_path: Path, layout: str) -> None:
    env = redundant(tmp_path, layout, defaults=BASE)
    config = fw_config(env, tmp_path)
    env.write({"pv_rev": "1"})
    env.write({"pv_rev": "2"})
    newest = env.active_copy
    assert newest is not None
    crc = copy_bytes(env, newest)[:4]
    poke(env, newest, 0, bytes(b ^ 0xFF for b in crc))

    assert env.read() == {**BASE, "pv_rev": "1"}
    assert env.active_copy == 1 - newest and not env.was_corrupt
    assert fw_printenv(config) == {**BASE, "pv_rev": "1"}

    env.write({"pv_rev": "3"})  # goes over the broken copy, not the good one
    assert env.active_copy == newest
    assert fw_printenv(config) == {**BASE, "pv_rev": "3"}


@needs_fw
def test_uboot_power_cut_in_the_middle_of_a_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = redundant(tmp_path, "offsets", defaults=BASE)
    config = fw_config(env, tmp_path)
    env.write({"pv_rev": "1"})
    env.write({"pv_rev": "2", "pv_try": "3"})
    before = {**BASE, "pv_rev": "2", "pv_try": "3"}
    active = env.active_copy

    class PowerCut(BaseException):
        pass

    real_pwrite = os.pwrite

    def pwrite_half(fd: int, data: bytes, offset: int) -> int:
        real_pwrite(fd, bytes(data)[:16], offset)  # header and a few bytes of data
        raise PowerCut

    # The start of the new image reaches the disk, then the power goes. (Cutting
    # inside the zero padding would leave a complete, valid copy: nothing to test.)
    monkeypatch.setattr(os, "pwrite", pwrite_half)
    with pytest.raises(PowerCut):
        env.write({"pv_rev": "3", "pv_try": None})
    monkeypatch.undo()

    after = UBootEnv(env.path, SIZE, offset=0x2000, redundant_offset=0x8000,
                     lockfile=tmp_path / "fw.lock")  # fmt: skip
    assert after.read() == before and after.active_copy == active
    assert fw_printenv(config) == before
    after.write({"pv_rev": "3", "pv_try": None})  # and the next write just works
    assert fw_printenv(config) == {**BASE, "pv_rev": "3"}


@needs_fw
def test_uboot_garbage_or_truncated_inactive_copy(tmp_path: Path) -> None:
    env = redundant(tmp_path, "files", defaults=BASE)
    config = fw_config(env, tmp_path)
    env.write({"pv_rev": "1"})
    env.write({"pv_rev": "2"})
    inactive = 1 - (env.active_copy or 0)
    poke(env, inactive, 0, os.urandom(SIZE // 2))  # a write that stopped half way
    assert env.read() == {**BASE, "pv_rev": "2"}
    assert fw_printenv(config) == {**BASE, "pv_rev": "2"}

    # A copy cut short counts as bad here; libubootenv refuses such a file
    # altogether, so only our reader is checked.
    with open(env.places[inactive].path, "r+b") as f:
        f.truncate(SIZE // 3)
    assert env.read() == {**BASE, "pv_rev": "2"}


@needs_fw
def test_uboot_flags_wrap_255_to_0(tmp_path: Path) -> None:
    env = redundant(tmp_path, "files", defaults=BASE)
    config = fw_config(env, tmp_path)
    data = uboot_mod.serialize_data({"pv_rev": "1"}, SIZE - 5)
    env.places[0].path.write_bytes(struct.pack("<IB", zlib.crc32(data), 0xFF) + data)
    assert env.read() == {"pv_rev": "1"} and env.active_copy == 0
    env.write({"pv_rev": "2"})
    assert copy_bytes(env, 1)[4] == 0 and env.active_copy == 1  # 0 beats 255
    assert env.read() == {"pv_rev": "2"}
    assert fw_printenv(config) == {"pv_rev": "2"}


@needs_fw
def test_uboot_all_copies_corrupt_reads_as_default(tmp_path: Path) -> None:
    env = redundant(tmp_path, "files")
    config = fw_config(env, tmp_path)
    assert env.read() == {} and env.was_corrupt and env.active_copy is None
    assert run("fw_printenv", "-c", config).returncode != 0  # it has no default either
    with pytest.raises(BootEnvError, match=r"^uboot: "):
        env.write({"pv_rev": "1"})


def test_uboot_overlapping_copies_refused(tmp_path: Path) -> None:
    with pytest.raises(BootEnvError, match=r"^uboot: the two copies overlap"):
        UBootEnv(tmp_path / "x", SIZE, offset=0, redundant_offset=SIZE - 1)


def test_uboot_missing_device_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(BootEnvError, match=r"^uboot: cannot open"):
        UBootEnv(tmp_path / "nope", SIZE, lockfile=None).read()


# --- GRUB ----------------------------------------------------------------------------------


def grub_list(path: Path) -> str:
    result = run("grub-editenv", path, "list")
    assert result.returncode == 0, result.stderr
    return result.stdout


@needs_grub
def test_grub_same_bytes_as_grub_editenv(tmp_path: Path) -> None:
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    assert run("grub-editenv", theirs, "create").returncode == 0
    env = GrubEnv(ours)
    steps: list[dict[str, str | None]] = [
        {"pv_rev": "1", "b": "x y", "c": "line1\nline2", "d": "back\\slash", "e": ""},
        {"pv_rev": "2"},
        {"b": None},
        {"f": "new"},
    ]
    for step in steps:
        sets = [f"{k}={v}" for k, v in step.items() if v is not None]
        unsets = [k for k, v in step.items() if v is None]
        if sets:
            assert run("grub-editenv", theirs, "set", *sets).returncode == 0
        if unsets:
            assert run("grub-editenv", theirs, "unset", *unsets).returncode == 0
        env.write(step)
        assert ours.read_bytes() == theirs.read_bytes()
    assert len(ours.read_bytes()) == GRUB_SIZE
    assert env.read() == {"pv_rev": "2", "c": "line1\nline2", "d": "back\\slash", "e": "",
                          "f": "new"}  # fmt: skip


@needs_grub
def test_grub_interop_both_ways(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    env = GrubEnv(path)
    assert env.read() == {} and not env.was_corrupt  # no file yet: nothing set
    env.write({"pv_rev": "1", "pv_try": "2"})
    assert grub_list(path) == "pv_rev=1\npv_try=2\n"

    assert run("grub-editenv", path, "set", "pv_trying=2", "pv_bootcount=1").returncode == 0
    assert run("grub-editenv", path, "unset", "pv_try").returncode == 0
    assert env.read() == {"pv_rev": "1", "pv_trying": "2", "pv_bootcount": "1"}
    env.write({"pv_trying": None, "pv_bootcount": None, "multi": "a\nb\\"})
    assert grub_list(path) == "pv_rev=1\nmulti=a\nb\\\n"


@needs_grub
def test_grub_overflow_refused_and_file_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    assert run("grub-editenv", path, "create").returncode == 0
    env = GrubEnv(path)
    env.write({"pv_rev": "1"})
    before = path.read_bytes()
    free = len(before.rstrip(b"#")) - GRUB_SIZE  # negative: bytes still free
    with pytest.raises(BootEnvError, match=r"^grub: environment needs"):
        env.write({"big": "x" * (-free - len("big=\n") + 1)})
    assert path.read_bytes() == before
    # grub-editenv draws the line at the same byte: one less fits exactly, with no '#' left
    assert run("grub-editenv", path, "set", "big=" + "x" * (-free - 4)).returncode == 1
    env.write({"big": "x" * (-free - len("big=\n"))})
    assert len(path.read_bytes()) == GRUB_SIZE and not path.read_bytes().endswith(b"#")
    assert "pv_rev=1\n" in grub_list(path)


@needs_grub
def test_grub_not_a_block_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "grub.cfg"
    path.write_text("menuentry 'Linux' { linux /vmlinuz }\n")
    env = GrubEnv(path)
    assert env.read() == {} and env.was_corrupt
    with pytest.raises(BootEnvError, match=r"^grub: .* is not a GRUB environment block"):
        env.write({"pv_rev": "1"})
    assert path.read_text() == "menuentry 'Linux' { linux /vmlinuz }\n"
    assert run("grub-editenv", path, "list").returncode != 0  # the tool refuses too


@pytest.mark.parametrize("name", ["", "a=b", "#a", "a\nb", "a\\b"])
def test_grub_invalid_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(BootEnvError, match=r"^grub: invalid variable name"):
        GrubEnv(tmp_path / "grubenv").write({name: "1"})


# --- Raspberry Pi tryboot ------------------------------------------------------------------


def autoboot(committed: int, trying: int) -> str:
    return f"[all]\ntryboot_a_b=1\nboot_partition={committed}\n[tryboot]\nboot_partition={trying}\n"


def fake_dt(tmp_path: Path, tryboot: int, partition: int) -> Path:
    """The firmware's /proc/device-tree/chosen/bootloader: 32-bit big-endian cells.

    The one fake in these tests: there is no Raspberry Pi firmware here to set them.
    """
    node = tmp_path / "dt" / "chosen" / "bootloader"
    node.mkdir(parents=True, exist_ok=True)
    (node / "tryboot").write_bytes(tryboot.to_bytes(4, "big"))
    (node / "partition").write_bytes(partition.to_bytes(4, "big"))
    return node


def rpi(tmp_path: Path, tryboot: int = 0, partition: int = 2) -> RpiTryboot:
    boot = tmp_path / "boot"
    boot.mkdir(exist_ok=True)
    return RpiTryboot(boot, dt_bootloader=fake_dt(tmp_path, tryboot, partition))


def test_rpi_commit_swaps_autoboot(tmp_path: Path) -> None:
    env = rpi(tmp_path)
    autoboot_txt = tmp_path / "boot" / "autoboot.txt"
    env.write({"pv_rev": "1"})
    assert autoboot_txt.read_text() == autoboot(2, 3)
    assert len(autoboot_txt.read_bytes()) <= AUTOBOOT_MAX
    assert (tmp_path / "boot" / "pvpy.env").read_text() == "pv_rev=1\nrpi_boot_partition=2\n"

    env.write({"pv_try": "2", "pv_trying": None, "pv_bootcount": "0"})
    assert autoboot_txt.read_text() == autoboot(2, 3)  # [tryboot] already names the try
    assert env.try_reboot_argument() == "0 tryboot"
    assert env.writes_try_partition()

    commit = {"pv_rev": "2", "pv_try": None, "pv_trying": None, "pv_bootcount": None}
    with pytest.raises(BootEnvError, match=r"^rpi: cannot commit revision 2"):
        env.write(commit)  # the firmware did not try-boot partition 3
    assert env.read() == {"pv_rev": "1", "pv_try": "2", "pv_bootcount": "0",
                          "rpi_boot_partition": "2"}  # fmt: skip
    assert autoboot_txt.read_text() == autoboot(2, 3)

    env = rpi(tmp_path, tryboot=1, partition=3)  # rebooted with "0 tryboot"
    assert env.booted_try(3) and not env.booted_try(2)
    env.write(commit)
    assert autoboot_txt.read_text() == autoboot(3, 2)
    assert env.read() == {"pv_rev": "2", "rpi_boot_partition": "3"}


def test_rpi_rollback_leaves_autoboot_alone(tmp_path: Path) -> None:
    env = rpi(tmp_path)
    autoboot_txt = tmp_path / "boot" / "autoboot.txt"
    env.write({"pv_rev": "1"})
    env.write({"pv_try": "2", "pv_bootcount": "0"})
    env = rpi(tmp_path, tryboot=1, partition=3)  # the try boots, then fails its tests
    env.write({"pv_try": None, "pv_trying": None, "pv_bootcount": None})
    # The firmware's flag is one-shot: the next plain boot is partition 2 again.
    assert autoboot_txt.read_text() == autoboot(2, 3)
    assert env.read() == {"pv_rev": "1", "rpi_boot_partition": "2"}


def test_rpi_commit_partition(tmp_path: Path) -> None:
    env = rpi(tmp_path)
    env.write({"pv_rev": "1"})
    with pytest.raises(BootEnvError, match=r"^rpi: partition 3 was not booted with tryboot"):
        env.commit_partition(3)
    with pytest.raises(BootEnvError, match=r"^rpi: partition 4 is not one of"):
        env.commit_partition(4)
    env.commit_partition(2)  # already committed: nothing to prove
    env = rpi(tmp_path, tryboot=1, partition=3)
    env.commit_partition(3)
    env.commit_partition(3)
    assert (tmp_path / "boot" / "autoboot.txt").read_text() == autoboot(3, 2)
    assert env.committed_partition() == 3


def test_rpi_adopts_existing_autoboot_and_heals_it(tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "autoboot.txt").write_text(autoboot(3, 2))
    env = rpi(tmp_path)
    assert env.read() == {}  # not provisioned: autoboot.txt is left as it is
    env.write({"pv_rev": "5"})
    assert (boot / "pvpy.env").read_text() == "pv_rev=5\nrpi_boot_partition=3\n"

    # A power cut after pvpy.env but before autoboot.txt: the next read fixes it.
    (boot / "autoboot.txt").write_text(autoboot(2, 3))
    assert env.read()["rpi_boot_partition"] == "3"
    assert (boot / "autoboot.txt").read_text() == autoboot(3, 2)


def test_rpi_derived_variable_and_no_device_tree(tmp_path: Path) -> None:
    env = RpiTryboot(tmp_path, dt_bootloader=tmp_path / "no-dt")
    assert not env.booted_try()  # no device tree: not a try
    with pytest.raises(BootEnvError, match=r"^rpi: rpi_boot_partition is derived"):
        env.write({"rpi_boot_partition": "3"})


# --- uboot-fat: uboot.env on the Pi's FAT partition, pvrev.env beside it -------------------
#
# U-Boot itself is not here (tests/test_rpi_qemu.py boots Debian's on QEMU's raspi3b);
# fw_printenv/fw_setenv read the file with Debian's u-boot-rpi geometry (0x4000, one copy).


def fat_dir(tmp_path: Path, rev: int | None = 1) -> Path:
    """A FAT partition as the image build writes it: uboot.env (U-Boot's defaults,
    the board's settings, pv_rev), u-boot-initial-env, pvrev.env."""
    fat = tmp_path / "fat"
    fat.mkdir()
    (fat / UBOOT_DEFAULTS).write_text("".join(f"{k}={v}\n" for k, v in BASE.items()))
    env = UBootEnv(fat / UBOOT_ENV, UBOOT_ENV_SIZE, defaults=BASE, lockfile=None)
    blank(env.path, UBOOT_ENV_SIZE)
    if rev is not None:
        env.write({"pv_rev": str(rev)})
        (fat / COMMITTED).write_text(f"pv_rev={rev}\n")
    return fat


def fat_env(fat: Path) -> UBootFatEnv:
    return UBootFatEnv(fat, lockfile=None)


def tear(path: Path) -> None:
    """A write cut in the middle: the first half of other bytes, the old rest (bad CRC)."""
    data = bytearray(path.read_bytes())
    data[: len(data) // 2] = bytes([0x5A]) * (len(data) // 2)
    path.write_bytes(bytes(data))


@needs_fw
def test_uboot_fat_commit_writes_env_then_pvrev_and_fw_printenv_agrees(tmp_path: Path) -> None:
    fat = fat_dir(tmp_path)
    env = fat_env(fat)
    assert env.name == "uboot-fat" and env.try_reboot_argument() is None
    assert not env.writes_try_partition()
    config = tmp_path / "fw_env.config"
    config.write_text(env.fw_env_config())
    assert env.fw_env_config() == f"{fat / UBOOT_ENV} 0x0 0x4000\n"
    env.write({"pv_try": "2", "pv_bootcount": "0"})
    assert fw_printenv(config) == {**BASE, "pv_rev": "1", "pv_try": "2", "pv_bootcount": "0"}
    assert env.committed() == 1  # a try is never the committed truth
    # U-Boot's marker, as saveenv writes it (fw_setenv stands in for U-Boot here).
    fw_setenv_script(config, tmp_path, ["pv_trying=2"])
    assert env.read()["pv_trying"] == "2"
    env.write({"pv_rev": "2", "pv_try": None, "pv_trying": None, "pv_bootcount": None})
    assert fw_printenv(config) == {**BASE, "pv_rev": "2"}
    assert (fat / COMMITTED).read_text() == "pv_rev=2\n" and env.committed() == 2
    assert not [p.name for p in fat.iterdir() if p.name.endswith(".tmp")]


def test_uboot_fat_torn_env_reads_defaults_and_the_committed_revision(tmp_path: Path) -> None:
    """A power cut while U-Boot's saveenv wrote uboot.env: its CRC fails, U-Boot boots
    its defaults; pvpy reads them too, with pv_rev from pvrev.env, and its next write
    makes a good uboot.env from them again (the try it knew nothing of is gone)."""
    fat = fat_dir(tmp_path)
    env = fat_env(fat)
    env.write({"pv_rev": "3", "pv_try": "4", "pv_bootcount": "0"})
    tear(fat / UBOOT_ENV)
    assert env.read() == {**BASE, "pv_rev": "3"} and env.was_corrupt
    env.write({"pv_try": None, "pv_trying": None, "pv_bootcount": None})  # clear_try
    assert not env.was_corrupt
    fresh = UBootEnv(fat / UBOOT_ENV, UBOOT_ENV_SIZE, lockfile=None)
    assert fresh.read() == {**BASE, "pv_rev": "3"} and not fresh.was_corrupt


def test_uboot_fat_missing_env_is_like_a_torn_one(tmp_path: Path) -> None:
    fat = fat_dir(tmp_path, rev=5)
    (fat / UBOOT_ENV).unlink()
    env = fat_env(fat)
    assert env.read() == {**BASE, "pv_rev": "5"} and env.was_corrupt
    env.write({"pv_rev": "6"})
    assert (fat / UBOOT_ENV).stat().st_size == UBOOT_ENV_SIZE
    assert fat_env(fat).read() == {**BASE, "pv_rev": "6"} and env.committed() == 6


def test_uboot_fat_without_defaults_never_writes_a_torn_env(tmp_path: Path) -> None:
    """No u-boot-initial-env: a new uboot.env of pvpy's variables alone would replace
    U-Boot's built-in environment (bootcmd included): refused, nothing written."""
    fat = fat_dir(tmp_path, rev=2)
    (fat / UBOOT_DEFAULTS).unlink()
    tear(fat / UBOOT_ENV)
    torn = (fat / UBOOT_ENV).read_bytes()
    env = fat_env(fat)
    assert env.read() == {"pv_rev": "2"}  # the committed revision is still known
    with pytest.raises(BootEnvError, match="refusing to write"):
        env.write({"pv_try": "3"})
    assert (fat / UBOOT_ENV).read_bytes() == torn and env.committed() == 2


def test_uboot_fat_pvrev_follows_the_env_after_a_cut_between_them(tmp_path: Path) -> None:
    """A cut after uboot.env committed 4 but before pvrev.env followed: pvrev.env
    names 3 (committed before: still a good revision). The next write, whatever it
    changes, brings pvrev.env to uboot.env's pv_rev."""
    fat = fat_dir(tmp_path, rev=3)
    UBootEnv(fat / UBOOT_ENV, UBOOT_ENV_SIZE, lockfile=None).write({"pv_rev": "4"})
    env = fat_env(fat)
    assert env.read()["pv_rev"] == "4" and env.committed() == 3
    env.write({"pv_try": None})  # clear_try after a boot: nothing changes in uboot.env
    assert env.committed() == 4


def test_uboot_fat_through_open_bootenv(tmp_path: Path) -> None:
    fat = fat_dir(tmp_path)
    env = open_bootenv(f"uboot-fat:{fat}")
    assert isinstance(env, UBootFatEnv) and env.read()["pv_rev"] == "1"


@pytest.mark.parametrize("spec", ["file:{d}/env", "uboot:{d}/uboot.env", "grub:{d}/grubenv"])
def test_bootloaders_that_read_the_storage_need_no_try_partition(tmp_path: Path, spec: str) -> None:
    env = open_bootenv(spec.format(d=tmp_path))
    assert env.try_reboot_argument() is None
    assert not env.writes_try_partition()


# --- choose_boot on every backend ----------------------------------------------------------


def make_file(tmp_path: Path) -> BootEnv:
    return FileBootEnv(tmp_path / "bootenv")


def make_uboot(tmp_path: Path) -> BootEnv:
    return single(tmp_path, defaults=BASE)


def make_uboot_redundant(tmp_path: Path) -> BootEnv:
    return redundant(tmp_path, "offsets", defaults=BASE)


def make_grub(tmp_path: Path) -> BootEnv:
    return GrubEnv(tmp_path / "grubenv")


def make_rpi(tmp_path: Path) -> BootEnv:
    return rpi(tmp_path)


def make_uboot_fat(tmp_path: Path) -> BootEnv:
    return fat_env(fat_dir(tmp_path, rev=None))


@pytest.mark.parametrize(
    "make", [make_file, make_uboot, make_uboot_redundant, make_grub, make_rpi, make_uboot_fat],
    ids=["file", "uboot", "uboot-redundant", "grub", "rpi", "uboot-fat"],
)  # fmt: skip
def test_choose_boot_tries_once_then_falls_back(
    tmp_path: Path, make: Callable[[Path], BootEnv]
) -> None:
    env = make(tmp_path)
    with pytest.raises(BootEnvError, match="no pv_rev"):
        choose_boot(env)
    env.write({"pv_rev": "1"})
    assert choose_boot(env) == choose_boot(env)  # nothing to try: no writes either
    assert choose_boot(env).revision == 1 and not choose_boot(env).trying

    env.write({"pv_try": "2", "pv_trying": None, "pv_bootcount": "0"})
    first = choose_boot(env)
    assert (first.revision, first.trying, first.failed_try) == (2, True, None)
    assert env.read()["pv_trying"] == "2" and env.read()["pv_bootcount"] == "1"
    second = choose_boot(env)  # the try did not commit before this boot
    assert (second.revision, second.trying, second.failed_try) == (1, False, 2)


@needs_fw
@needs_grub
def test_choose_boot_writes_are_what_the_bootloader_tools_see(tmp_path: Path) -> None:
    uboot = redundant(tmp_path, "files", defaults=BASE)
    grub = GrubEnv(tmp_path / "grubenv")
    for env in (uboot, grub):
        env.write({"pv_rev": "1", "pv_try": "2", "pv_bootcount": "0"})
        assert choose_boot(env).trying
    config = fw_config(uboot, tmp_path)
    assert fw_printenv(config) == {**BASE, "pv_rev": "1", "pv_try": "2", "pv_trying": "2",
                                   "pv_bootcount": "1"}  # fmt: skip
    assert grub_list(tmp_path / "grubenv") == "pv_rev=1\npv_try=2\npv_bootcount=1\npv_trying=2\n"


# What U-Boot's ext4load sees: it reads an ext4 file system without replaying its
# journal. debugfs reads it the same way, here while Linux still has it mounted.
CHECKPOINT_PROBE = """
set -e
mount -o loop "$1" "$2"
"$3" -c '
import sys
from pathlib import Path
from pvpy.device.bootenv.file import FileBootEnv
from pvpy.store import write_atomic
mnt = Path(sys.argv[1])
FileBootEnv(mnt / "bootenv").write({"pv_rev": "1"})
FileBootEnv(mnt / "bootenv").write({"pv_rev": "2", "pv_try": "3"})
write_atomic(mnt / "plain", b"written after the last checkpoint\\n")
' "$2"
echo "bootenv: $(debugfs -R 'cat /bootenv' "$1" 2>/dev/null | tr '\\n' ' ')"
echo "plain: $(debugfs -R 'cat /plain' "$1" 2>/dev/null)"
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a loop-mounted ext4)")
@pytest.mark.skipif(
    shutil.which("mkfs.ext4") is None or shutil.which("debugfs") is None,
    reason="needs e2fsprogs (mkfs.ext4, debugfs)",
)
def test_a_file_boot_env_is_what_a_reader_without_the_journal_sees(tmp_path: Path) -> None:
    """After a power cut U-Boot must read the boot env PID 1 last wrote, not an old
    directory entry or a freed inode: each write checkpoints ext4's journal (found
    by the QEMU soak: a cut seconds after a commit booted the old revision)."""
    import sys

    image, mnt = tmp_path / "ext4.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", CHECKPOINT_PROBE, "probe",
         str(image), str(mnt), sys.executable],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    lines = dict(line.split(": ", 1) for line in probe.stdout.splitlines())
    assert lines["bootenv"].split() == ["pv_rev=2", "pv_try=3"]
    # the control: a file written without a checkpoint is not there yet for such a reader
    assert "written after" not in lines["plain"]
