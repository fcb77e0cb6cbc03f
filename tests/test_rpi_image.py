"""Raspberry Pi images: U-Boot (boards/rpi3, boards/rpi4) and tryboot (boards/rpi4-tryboot,
boards/rpi5): structure, boot environments, a QEMU boot of the tryboot images' kernel.

U-Boot images: the MBR, every file of the FAT partition (firmware, config.txt
with kernel=u-boot.bin, Debian's U-Boot byte for byte, boot.scr holding the
shared boot script, uboot.env as fw_printenv reads it, u-boot-initial-env,
pvrev.env), the storage; and the ``uboot-fat`` boot environment on the image's
own FAT files (a try, a torn uboot.env, a commit). The U-Boot chain itself boots
on QEMU's raspi3b in tests/test_rpi_qemu.py.

Tryboot images. There is no Raspberry Pi here, so what only the Pi's firmware does is not
tested: loading config.txt, honouring autoboot.txt and the one-shot tryboot
flag. What is tested is everything pvpy writes for it, read back from the
disk image with the tools a person would use (sfdisk, mtools, the ext4
superblock): the MBR, the files of each FAT partition, config.txt,
cmdline.txt and autoboot.txt; the commit and the rollback of a try done by
``pvpy.device.bootenv.rpi.RpiTryboot`` on the image's own config partition (the
firmware's device-tree report of a tryboot is the one thing faked); and the
image's kernel and initramfs booted on QEMU's ``virt`` machine with the SD
image as a virtio disk, up to pvpy as PID 1 with its containers running and
its API answering over DHCP; and a BSP update pushed into that guest: PID 1
writes boot partition B and asks for the tryboot reboot, which QEMU (like
Debian's kernel) cannot honour, so the update ends ERROR on revision 1.

Fast (no marker): the layout built by the same functions from a tiny fake BSP.
Slow (marker ``qemu``): real images from Debian's arm64 packages (shared
cache ~/.cache/pvpy, ~15 s per image once cached) and the QEMU boots.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pvpy.device.bootenv.rpi import RpiTryboot
from pvpy.device.bootenv.ubootfat import UBootFatEnv
from pvpy.errors import BootEnvError, PvpyError
from pvpy.rpiboot import (
    AUTOBOOT,
    AUTOBOOT_MAX,
    BOOT_SCRIPT,
    COMMITTED,
    ENV_FILE,
    UBOOT_BIN,
    UBOOT_DEFAULTS,
    UBOOT_ENV,
    UBOOT_ENV_SIZE,
    autoboot_text,
)
from pvpy.signing import generate_key
from pvpy.state import canonical
from pvpy.store import ObjectStore
from pvpy.workstation.image import (
    DEFAULT_SPEC,
    IMAGE_MANIFEST,
    RPI_CMDLINE,
    RPI_CONFIG,
    RPI_INITRD,
    RPI_KERNEL,
    ImageBuild,
    RpiLayout,
    build_image,
    build_rpi_disk,
    load_board,
    rpi_layout,
    write_rpi_manifest,
)
from pvpy.workstation.image.rpi import write_rpi_uboot_disk
from pvpy.workstation.qemu import Machine, ensure_qemu, qemu_argv
from tests import apiclient
from tests.conftest import write_revision
from tests.device import free_port

qemu = pytest.mark.qemu

REPO = Path(__file__).resolve().parent.parent
BOOT_TIMEOUT = 240.0  # TCG on a busy 2-core box; ~60 s when idle
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


# -- reading a disk image back ------------------------------------------------------------


def partitions(disk: Path) -> dict[str, Any]:
    """``sfdisk --json``'s partition table."""
    out = subprocess.run(["sfdisk", "--json", str(disk)], check=True, capture_output=True)
    table: dict[str, Any] = json.loads(out.stdout)["partitiontable"]
    return table


def offset(disk: Path, number: int) -> int:
    return int(partitions(disk)["partitions"][number - 1]["start"]) * 512


def fat_names(disk: Path, number: int) -> set[str]:
    """The file names in the root of FAT partition ``number`` (mdir, long names)."""
    out = subprocess.run(["mdir", "-b", "-i", f"{disk}@@{offset(disk, number)}", "::/"],
                         check=True, capture_output=True, env=MTOOLS_ENV)  # fmt: skip
    return {line.removeprefix("::/") for line in out.stdout.decode().split()}


def fat_read(disk: Path, number: int, name: str) -> bytes:
    out = subprocess.run(["mcopy", "-n", "-i", f"{disk}@@{offset(disk, number)}", f"::/{name}", "-"],
                         check=True, capture_output=True, env=MTOOLS_ENV)  # fmt: skip
    return out.stdout


def fat_write(disk: Path, number: int, name: str, source: Path) -> None:
    subprocess.run(["mcopy", "-o", "-i", f"{disk}@@{offset(disk, number)}", str(source),
                    f"::/{name}"], check=True, capture_output=True, env=MTOOLS_ENV)  # fmt: skip


def fat_label(disk: Path, number: int) -> str:
    out = subprocess.run(["mlabel", "-s", "-i", f"{disk}@@{offset(disk, number)}", "::"],
                         check=True, capture_output=True, env=MTOOLS_ENV)  # fmt: skip
    return out.stdout.decode().split(" is ", 1)[-1].strip()


def ext4_label(disk: Path, number: int) -> str | None:
    """The volume label of an ext4 partition, from its superblock (None: not ext*)."""
    with open(disk, "rb") as f:
        f.seek(offset(disk, number) + 1024)
        sb = f.read(1024)
    if struct.unpack_from("<H", sb, 0x38)[0] != 0xEF53:
        return None
    return sb[0x78:0x88].rstrip(b"\0").decode()


def need_disk_tools() -> None:
    for tool in ("sfdisk", "mkfs.vfat", "mcopy", "mdir", "mlabel", "mkfs.ext4"):
        if shutil.which(tool, path=MTOOLS_ENV["PATH"]) is None:
            pytest.skip(f"{tool} not installed (tools/setup installs fdisk, dosfstools, mtools)")


# -- what every rpi image must look like -----------------------------------------------------


def check_layout(disk: Path, image_dir: Path, revision_dir: Path) -> None:
    """The MBR, the FAT partitions' files and contents, the storage's label, as the
    board and the signed factory revision say."""
    manifest = json.loads((image_dir / IMAGE_MANIFEST).read_text())
    board = load_board(manifest["board_dir"])
    layout = rpi_layout(board)
    parts = board.get("partitions")
    table = partitions(disk)
    assert table["label"] == "dos"  # the firmware reads MBR, not GPT
    assert [p["type"] for p in table["partitions"]] == [str(p["type"]) for p in parts]
    for entry, part in zip(table["partitions"], parts, strict=True):
        assert entry["start"] % 2048 == 0, entry  # 1 MiB aligned
        assert entry["size"] * 512 == int(part["size"].rstrip("M")) << 20, entry
    assert (layout.config, layout.boot, layout.storage) == (1, (2, 3), 4)
    assert manifest["partitions"] == {"config": 1, "boot": [2, 3], "storage": 4}

    # p1: what the firmware reads first, and pvpy's variables beside it.
    assert fat_label(disk, 1) == "PVCONFIG"
    assert fat_names(disk, 1) == {AUTOBOOT, ENV_FILE}
    autoboot = fat_read(disk, 1, AUTOBOOT)
    assert autoboot == b"[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n"
    assert len(autoboot) <= AUTOBOOT_MAX
    assert fat_read(disk, 1, ENV_FILE) == b"pv_rev=1\nrpi_boot_partition=2\n"

    # p2, p3: the same boot files (revision 1 in both), the BSP objects byte for byte.
    state = canonical.decode((revision_dir / "state.json").read_bytes())
    bsp = state["bsp"]
    fw = board.get("bootloader", "firmware")
    dtb = Path(board.get("dtb")).name if "dtb" in bsp else None
    expected = {*fw["files"], RPI_KERNEL, RPI_INITRD, RPI_CONFIG, RPI_CMDLINE}
    if dtb:
        expected.add(dtb)
    for number, label in ((2, "PVBOOTA"), (3, "PVBOOTB")):
        assert fat_label(disk, number) == label
        assert fat_names(disk, number) == expected
        for name, part in ((RPI_KERNEL, "kernel"), (RPI_INITRD, "initrd"), (dtb, "dtb")):
            if name is not None:
                data = fat_read(disk, number, name)
                assert hashlib.sha256(data).hexdigest() == bsp[part]["sha256"], (number, name)
        config = fat_read(disk, number, RPI_CONFIG).decode().splitlines()
        for line in ("arm_64bit=1", "enable_uart=1", "dtparam=watchdog=on", f"kernel={RPI_KERNEL}",
                     f"initramfs {RPI_INITRD} followkernel"):  # fmt: skip
            assert line in config, (number, config)
        assert (f"device_tree={dtb}" in config) == bool(dtb), config
        cmdline = fat_read(disk, number, RPI_CMDLINE).decode()
        assert cmdline.count("\n") == 1 and cmdline.endswith("\n"), cmdline  # one line
        assert cmdline.split() == [f"console={board.get('console')}", *bsp["cmdline"].split(),
                                   "pv_rev=1"]  # fmt: skip
    assert ext4_label(disk, 4) == "pvstorage"


def check_tryboot(disk: Path, work: Path) -> None:
    """RpiTryboot on the image's config partition: a try that the firmware abandons
    leaves autoboot.txt alone; a try it booted is committed by swapping A and B."""
    work.mkdir(parents=True)
    boot_dir, dt = work / "config", work / "dt"
    boot_dir.mkdir()
    dt.mkdir()
    for name in fat_names(disk, 1):
        (boot_dir / name).write_bytes(fat_read(disk, 1, name))
    # The firmware's report in /proc/device-tree/chosen/bootloader (faked: no Pi).
    tryboot, partition = dt / "tryboot", dt / "partition"

    def firmware_booted(part: int, flag: bool) -> None:
        tryboot.write_bytes(struct.pack(">I", int(flag)))
        partition.write_bytes(struct.pack(">I", part))

    env = RpiTryboot(boot_dir, dt_bootloader=dt)
    factory = (boot_dir / AUTOBOOT).read_bytes()
    firmware_booted(2, False)
    assert env.read()["pv_rev"] == "1" and env.committed_partition() == 2

    # Revision 2's files went to partition 3; pv_try set, then reboot "0 tryboot".
    env.write({"pv_try": "2", "pv_bootcount": "0"})
    assert (boot_dir / AUTOBOOT).read_bytes() == factory  # the default stays A
    # Rollback: the try hung, the watchdog reset the board, the one-shot flag was
    # gone: the firmware booted A again. Committing 2 from there is refused ...
    firmware_booted(2, False)
    with pytest.raises(BootEnvError, match="not booted with tryboot"):
        env.write({"pv_rev": "2", "pv_try": None})
    # ... and PID 1 records the failure and clears the try: autoboot.txt untouched.
    env.write({"pv_try": None, "pv_bootcount": None})
    assert (boot_dir / AUTOBOOT).read_bytes() == factory
    assert env.read() == {"pv_rev": "1", "rpi_boot_partition": "2"}

    # Commit: revision 2 again on partition 3, and this time the firmware booted it.
    env.write({"pv_try": "2", "pv_bootcount": "0"})
    firmware_booted(3, True)
    env.write({"pv_rev": "2", "pv_try": None, "pv_bootcount": None})
    committed = autoboot_text(3, 2).encode()
    assert (boot_dir / AUTOBOOT).read_bytes() == committed
    assert committed == b"[all]\ntryboot_a_b=1\nboot_partition=3\n[tryboot]\nboot_partition=2\n"
    assert env.read() == {"pv_rev": "2", "rpi_boot_partition": "3"}

    # The rewrite, back on the image's FAT partition, reads back the same.
    copy = work / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(disk), str(copy)], check=True)
    for name in (AUTOBOOT, ENV_FILE):
        fat_write(copy, 1, name, boot_dir / name)
    assert fat_read(copy, 1, AUTOBOOT) == committed
    assert fat_names(copy, 1) == {AUTOBOOT, ENV_FILE}  # no temp files left behind
    # And the next commit (B -> A) swaps back.
    env.write({"pv_try": "3", "pv_bootcount": "0"})
    firmware_booted(2, True)
    env.write({"pv_rev": "3", "pv_try": None, "pv_bootcount": None})
    assert (boot_dir / AUTOBOOT).read_bytes() == factory


# -- fast: the layout from a fake BSP (no packages, no QEMU) ---------------------------------


@pytest.fixture
def fake_image(tmp_path: Path) -> ImageBuild:
    """``build_rpi_disk`` on a board like rpi4 with small partitions, fake firmware
    files and a signed revision whose BSP objects are a few bytes each."""
    need_disk_tools()
    board_dir = tmp_path / "board" / "rpi-small"
    board_dir.mkdir(parents=True)
    text = (REPO / "boards/rpi4-tryboot/board.yaml").read_text()
    text = text.replace("name: rpi4-tryboot", "name: rpi-small").replace("size: 256M", "size: 40M")
    text = text.replace("size: 512M", "size: 8M")
    (board_dir / "board.yaml").write_text(text)
    board = load_board(str(board_dir))
    firmware = tmp_path / "firmware"
    fw = board.get("bootloader", "firmware")
    for name in fw["files"]:
        (firmware / fw["dir"]).mkdir(parents=True, exist_ok=True)
        (firmware / fw["dir"] / name).write_bytes(f"firmware {name}".encode())
    revision = tmp_path / "revision"
    objects = ObjectStore(revision / "objects").ensure()
    bsp: dict[str, Any] = {"cmdline": "quiet loglevel=3"}
    for part in ("kernel", "initrd", "dtb"):
        data = f"fake {part}".encode()
        bsp[part] = {"sha256": objects.put_bytes(data), "size": len(data)}
    write_revision(revision, 1, [generate_key(tmp_path / "key")], bsp=bsp)
    storage = tmp_path / "storage"
    (storage / "trails").mkdir(parents=True)
    (storage / "bootenv").write_text("pv_rev=1\n")
    out = tmp_path / "img"
    (out / ".work").mkdir(parents=True)
    b = ImageBuild(board=board, out=out, disk=out / "disk.img", spec=DEFAULT_SPEC, key=None,
                   cache=tmp_path / "cache", work=out / ".work", revision=1,
                   revision_dir=revision, storage=storage, firmware_root=firmware)  # fmt: skip
    build_rpi_disk(b)
    write_rpi_manifest(b)
    return b


def test_layout_of_a_fake_bsp(fake_image: ImageBuild) -> None:
    check_layout(fake_image.disk, fake_image.out, fake_image.revision_dir)
    assert not list(fake_image.work.glob("part*.img")), "partition images left behind"


def test_tryboot_commit_and_rollback_on_the_config_partition(
    fake_image: ImageBuild, tmp_path: Path,
) -> None:  # fmt: skip
    check_tryboot(fake_image.disk, tmp_path / "tryboot")


def test_layout_refuses_a_board_without_a_b(tmp_path: Path) -> None:
    from pvpy.errors import ManifestError

    board_dir = tmp_path / "rpi-bad"
    board_dir.mkdir()
    text = (REPO / "boards/rpi4-tryboot/board.yaml").read_text()
    text = text.replace("name: rpi4-tryboot", "name: rpi-bad")
    text = text.replace("label: PVBOOTB, size: 256M, content: boot", "label: PVBOOTB, size: 256M")
    (board_dir / "board.yaml").write_text(text)
    with pytest.raises(ManifestError, match="two 'content: boot'"):
        rpi_layout(load_board(str(board_dir)))


# -- U-Boot images (rpi3, rpi4) ----------------------------------------------------------------

SHARED_SCRIPT = REPO / "boards/qemu-arm64/boot.cmd"  # the U-Boot boards' one boot script


def script_text(scr: bytes) -> str:
    """The commands of a mkimage -T script image: a 64-byte legacy header, a table of
    sub-image sizes ended by 0, then the script."""
    assert scr[:4] == b"\x27\x05\x19\x56", "not a U-Boot legacy image"
    assert scr[30] == 6, "not of type script"  # ih_type IH_TYPE_SCRIPT
    size = struct.unpack_from(">I", scr, 64)[0]
    assert struct.unpack_from(">I", scr, 68)[0] == 0
    return scr[72 : 72 + size].decode()


def fw_printenv(env: bytes, work: Path) -> dict[str, str]:
    """uboot.env as Debian's fw_printenv reads it with u-boot-rpi's geometry."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "uboot.env").write_bytes(env)
    (work / "fw_env.config").write_text(f"{work / 'uboot.env'} 0x0 {UBOOT_ENV_SIZE:#x}\n")
    out = subprocess.run(["fw_printenv", "-c", str(work / "fw_env.config")],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return dict(line.split("=", 1) for line in out.stdout.splitlines())


def check_uboot_layout(disk: Path, image_dir: Path, revision_dir: Path, u_boot: Path,
                       work: Path) -> None:  # fmt: skip
    """The MBR, the FAT partition's files and contents, the storage's label."""
    manifest = json.loads((image_dir / IMAGE_MANIFEST).read_text())
    board = load_board(manifest["board_dir"])
    parts = board.get("partitions")
    table = partitions(disk)
    assert table["label"] == "dos"
    assert [p["type"] for p in table["partitions"]] == ["c", "83"]
    for entry, part in zip(table["partitions"], parts, strict=True):
        assert entry["start"] % 2048 == 0, entry
        assert entry["size"] * 512 == int(part["size"].rstrip("M")) << 20, entry
    assert rpi_layout(board) == RpiLayout(config=1, boot=(), storage=2)
    assert manifest["boot"] == "u-boot-rpi"
    assert manifest["partitions"] == {"config": 1, "storage": 2}

    assert fat_label(disk, 1) == "PVBOOT"
    bsp = canonical.decode((revision_dir / "state.json").read_bytes())["bsp"]
    dtb = Path(board.get("dtb")).name
    fw = board.get("bootloader", "firmware")
    assert fat_names(disk, 1) == {*fw["files"], dtb, RPI_CONFIG, UBOOT_BIN, BOOT_SCRIPT,
                                  UBOOT_ENV, UBOOT_DEFAULTS, COMMITTED}  # fmt: skip
    assert fat_read(disk, 1, UBOOT_BIN) == u_boot.read_bytes()
    assert hashlib.sha256(fat_read(disk, 1, dtb)).hexdigest() == bsp["dtb"]["sha256"]
    config = fat_read(disk, 1, RPI_CONFIG).decode().splitlines()
    assert config[1:] == [*board.get("bootloader", "config"), f"kernel={UBOOT_BIN}",
                          f"device_tree={dtb}"], config  # fmt: skip
    assert script_text(fat_read(disk, 1, BOOT_SCRIPT)) == SHARED_SCRIPT.read_text()
    # uboot.env: U-Boot's built-in environment (from its binary), the board's
    # settings, pv_rev; u-boot-initial-env the same without pv_rev; pvrev.env.
    env = fat_read(disk, 1, UBOOT_ENV)
    assert len(env) == UBOOT_ENV_SIZE == 0x4000
    values = fw_printenv(env, work)
    assert values["pv_rev"] == "1" and values["bootdelay"] == "0", values
    assert values["bootcmd"] == board.get("bootloader", "env", "bootcmd")
    assert values["board"] == "rpi" and values["scriptaddr"] == "0x02400000"
    assert b"distro_bootcmd=" + values["distro_bootcmd"].encode() in u_boot.read_bytes()
    initial = fat_read(disk, 1, UBOOT_DEFAULTS).decode()
    assert dict(line.split("=", 1) for line in initial.splitlines()) == {
        k: v for k, v in values.items() if k != "pv_rev"}  # fmt: skip
    assert fat_read(disk, 1, COMMITTED) == b"pv_rev=1\n"
    assert ext4_label(disk, 2) == "pvstorage"


def check_uboot_env(disk: Path, work: Path) -> None:
    """The ``uboot-fat`` backend on the image's own FAT files: a try, uboot.env torn
    while U-Boot writes its marker (U-Boot's defaults and pvrev.env's revision), the
    repair, a commit; written back into a copy of the image and read with mtools."""
    fat = work / "fat"
    fat.mkdir(parents=True)
    for name in (UBOOT_ENV, UBOOT_DEFAULTS, COMMITTED):
        (fat / name).write_bytes(fat_read(disk, 1, name))
    env = UBootFatEnv(fat, lockfile=None)
    factory = env.read()
    assert factory["pv_rev"] == "1" and not env.was_corrupt
    before = (fat / UBOOT_ENV).read_bytes()
    env.write({"pv_try": "2", "pv_bootcount": "0"})
    # A write cut after its first bytes: the new CRC, the old data after it.
    torn = (fat / UBOOT_ENV).read_bytes()[:4] + before[4:]
    assert struct.unpack_from("<I", torn)[0] != zlib.crc32(torn[4:])
    (fat / UBOOT_ENV).write_bytes(torn)
    assert env.read() == factory and env.was_corrupt  # the built-in env, pv_rev from pvrev.env
    env.write({"pv_try": None, "pv_bootcount": None})  # PID 1 clears the forgotten try
    assert env.read() == factory and not env.was_corrupt
    env.write({"pv_rev": "2"})
    assert (fat / COMMITTED).read_bytes() == b"pv_rev=2\n"
    copy = work / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(disk), str(copy)], check=True)
    for name in (UBOOT_ENV, COMMITTED):
        fat_write(copy, 1, name, fat / name)
    assert fw_printenv(fat_read(copy, 1, UBOOT_ENV), work / "fw") == {**factory, "pv_rev": "2"}


FAKE_U_BOOT_ENV = {
    "bootcmd": "run distro_bootcmd",
    "board": "rpi",
    "bootdelay": "2",
    "scriptaddr": "0x02400000",
    "distro_bootcmd": "for t in mmc0; do run x; done",
}


@pytest.fixture
def fake_uboot_image(tmp_path: Path) -> tuple[ImageBuild, Path]:
    """``write_rpi_uboot_disk`` on rpi3's board with a small storage, fake firmware
    files, a fake U-Boot binary holding a default environment as Debian's do, and a
    signed revision with a few-byte BSP."""
    need_disk_tools()
    if shutil.which("mkimage") is None:
        pytest.skip("mkimage not installed (u-boot-tools; pvpy image build installs it)")
    board_dir = tmp_path / "board" / "rpi-small-uboot"
    board_dir.mkdir(parents=True)
    text = (
        (REPO / "boards/rpi3/board.yaml").read_text().replace("name: rpi3", "name: rpi-small-uboot")
    )
    (board_dir / "board.yaml").write_text(text.replace("size: 512M", "size: 8M"))
    (board_dir / "boot.cmd").symlink_to(SHARED_SCRIPT)
    board = load_board(str(board_dir))
    u_boot = tmp_path / "u-boot.bin"
    u_boot.write_bytes(b"\x00code" + b"".join(f"{k}={v}".encode() + b"\0" for k, v in
                                                  FAKE_U_BOOT_ENV.items()) + b"\0more code")  # fmt: skip
    firmware = tmp_path / "firmware"
    fw = board.get("bootloader", "firmware")
    (firmware / fw["dir"]).mkdir(parents=True)
    for name in fw["files"]:
        (firmware / fw["dir"] / name).write_bytes(f"firmware {name}".encode())
    revision = tmp_path / "revision"
    objects = ObjectStore(revision / "objects").ensure()
    bsp: dict[str, Any] = {"cmdline": "quiet"}
    for part in ("kernel", "initrd", "dtb"):
        data = f"fake {part}".encode()
        bsp[part] = {"sha256": objects.put_bytes(data), "size": len(data)}
    write_revision(revision, 1, [generate_key(tmp_path / "key")], bsp=bsp)
    storage = tmp_path / "storage"
    (storage / "trails").mkdir(parents=True)
    out = tmp_path / "img"
    (out / ".work").mkdir(parents=True)
    b = ImageBuild(board=board, out=out, disk=out / "disk.img", spec=DEFAULT_SPEC, key=None,
                   cache=tmp_path / "cache", work=out / ".work", revision=1,
                   revision_dir=revision, storage=storage, firmware_root=firmware,
                   dtb=revision / "objects" / bsp["dtb"]["sha256"])  # fmt: skip
    write_rpi_uboot_disk(b, u_boot)
    write_rpi_manifest(b)
    return b, u_boot


def test_uboot_layout_of_a_fake_bsp(fake_uboot_image: tuple[ImageBuild, Path],
                                    tmp_path: Path) -> None:  # fmt: skip
    b, u_boot = fake_uboot_image
    from pvpy.workstation.image.board import rpi_dtb_name

    assert rpi_dtb_name(b.board) == "bcm2837-rpi-3-b.dtb"
    # the fake DTB object is named by its hash: the FAT copy must carry the board's name
    check_uboot_layout(b.disk, b.out, b.revision_dir, u_boot, tmp_path / "fw")
    assert not list(b.work.glob("part*.img")), "partition images left behind"


def test_uboot_env_on_the_fat_partition(fake_uboot_image: tuple[ImageBuild, Path],
                                        tmp_path: Path) -> None:  # fmt: skip
    check_uboot_env(fake_uboot_image[0].disk, tmp_path / "env")


def test_uboot_layout_refuses_a_board_without_a_first_fat(tmp_path: Path) -> None:
    from pvpy.errors import ManifestError

    board_dir = tmp_path / "rpi-bad"
    board_dir.mkdir()
    text = (REPO / "boards/rpi3/board.yaml").read_text().replace("name: rpi3", "name: rpi-bad")
    text = text.replace("{name: boot, fs: vfat,", "{name: boot, fs: ext4,")
    (board_dir / "board.yaml").write_text(text)
    with pytest.raises(ManifestError, match="a first vfat one"):
        rpi_layout(load_board(str(board_dir)))


@pytest.fixture(scope="module", params=["rpi3", "rpi4"])
def uboot_image(request: pytest.FixtureRequest, demo_spec: Path,
                tmp_path_factory: pytest.TempPathFactory) -> ImageBuild:  # fmt: skip
    board = str(request.param)
    return build_image(board, tmp_path_factory.mktemp(board) / "img", spec=demo_spec)


@qemu
@pytest.mark.timeout(900)
def test_uboot_image_structure(uboot_image: ImageBuild, tmp_path: Path) -> None:
    from pvpy.workstation.image import rpi as image_rpi

    image = uboot_image
    u_boot = image_rpi.fetch_u_boot_rpi(image)  # cached: the binary the build copied
    assert u_boot.parts[-2:] == ("rpi_arm64", "u-boot.bin")
    check_uboot_layout(image.disk, image.out, image.revision_dir, u_boot, tmp_path / "fw")
    names = fat_names(image.disk, 1)
    if image.board.name == "rpi4":
        assert {"start4.elf", "fixup4.dat", "bcm2711-rpi-4-b.dtb"} <= names
    else:
        assert {"bootcode.bin", "start.elf", "fixup.dat", "bcm2837-rpi-3-b.dtb"} <= names
    # The storage: the factory revision, whose boot.env names its kernel, initrd and DTB.
    bsp = canonical.decode((image.revision_dir / "state.json").read_bytes())["bsp"]
    storage = tmp_path / "storage.img"
    part = partitions(image.disk)["partitions"][1]
    subprocess.run(["dd", f"if={image.disk}", f"of={storage}", "bs=512", f"skip={part['start']}",
                    f"count={part['size']}", "conv=sparse", "status=none"], check=True)  # fmt: skip
    boot_env = subprocess.run(["debugfs", "-R", "cat /trails/1/boot.env", str(storage)],
                              check=True, capture_output=True).stdout.decode()  # fmt: skip
    assert f"pv_fdt={bsp['dtb']['sha256']}" in boot_env.splitlines(), boot_env
    assert f"pv_kernel={bsp['kernel']['sha256']}" in boot_env.splitlines(), boot_env


@qemu
@pytest.mark.timeout(900)
def test_uboot_image_env(uboot_image: ImageBuild, tmp_path: Path) -> None:
    check_uboot_env(uboot_image.disk, tmp_path)


# -- slow: real images, booted -----------------------------------------------------------


@pytest.fixture(scope="module")
def demo_spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/demo's specs with their rootfs trees built here (as test_qemu.py does)."""
    demo = tmp_path_factory.mktemp("demo")
    for spec in DEFAULT_SPEC.parent.glob("spec*.yaml"):
        shutil.copy(spec, demo / spec.name)
    for overlay in sorted((DEFAULT_SPEC.parent / "overlays").iterdir()):
        subprocess.run([str(REPO / "rootfs/busybox-tree"), str(demo / "build" / overlay.name),
                        str(overlay)], check=True, capture_output=True)  # fmt: skip
    return demo / "spec.yaml"


@pytest.fixture(scope="module", params=["rpi4-tryboot", "rpi5"])
def image(request: pytest.FixtureRequest, demo_spec: Path,
          tmp_path_factory: pytest.TempPathFactory) -> ImageBuild:  # fmt: skip
    board = str(request.param)
    return build_image(board, tmp_path_factory.mktemp(board) / "img", spec=demo_spec)


@qemu
@pytest.mark.timeout(900)
def test_image_structure(image: ImageBuild) -> None:
    check_layout(image.disk, image.out, image.revision_dir)
    bsp = canonical.decode((image.revision_dir / "state.json").read_bytes())["bsp"]
    if image.board.name == "rpi4-tryboot":
        assert {"start4.elf", "fixup4.dat", "bcm2711-rpi-4-b.dtb"} <= fat_names(image.disk, 2)
        assert image.dtb is not None and bsp["dtb"]["size"] == image.dtb.stat().st_size
    else:  # bookworm's kernel has no BCM2712 tree; the Pi 5 needs no start*.elf
        assert "dtb" not in bsp and image.dtb is None
        assert not any(n.endswith((".elf", ".dtb")) for n in fat_names(image.disk, 2))
    # The storage partition holds the provisioned factory revision (file boot env).
    storage = image.out / "storage.img"
    part = partitions(image.disk)["partitions"][3]
    subprocess.run(["dd", f"if={image.disk}", f"of={storage}", "bs=512", f"skip={part['start']}",
                    f"count={part['size']}", "conv=sparse", "status=none"], check=True)  # fmt: skip
    listing = subprocess.run(["debugfs", "-R", "ls -p /trails", str(storage)], check=True,
                             capture_output=True).stdout.decode()  # fmt: skip
    assert "/1/" in listing, listing
    bootenv = subprocess.run(["debugfs", "-R", "cat /bootenv", str(storage)], check=True,
                             capture_output=True).stdout.decode()  # fmt: skip
    assert "pv_rev=1" in bootenv.splitlines(), bootenv
    storage.unlink()


@qemu
@pytest.mark.timeout(900)
def test_image_tryboot_commit_and_rollback(image: ImageBuild, tmp_path: Path) -> None:
    check_tryboot(image.disk, tmp_path / "tryboot")


def wait_for_other_qemu(limit: float = 1800.0) -> None:
    """Do not boot beside another QEMU run (e.g. tests/test_qemu.py in another
    session): two TCG guests on two cores starve each other into timeouts."""

    def running() -> bool:  # argv[0] only: `pgrep -f` also matches shells naming it
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                argv0 = cmdline.read_bytes().split(b"\0", 1)[0]
            except OSError:
                continue
            if Path(argv0.decode(errors="replace")).name == "qemu-system-aarch64":
                return True
        return False

    deadline = time.monotonic() + limit
    while running() and time.monotonic() < deadline:
        time.sleep(5)


@pytest.fixture
def booted(image: ImageBuild, tmp_path: Path) -> Iterator[tuple[Machine, int]]:
    """``pvpy qemu run``'s machine for the image: the committed boot partition's
    kernel, initramfs and command line booted with ``-kernel/-initrd/-append`` on
    QEMU virt (the Pi's firmware does the same from config.txt), the SD image as
    virtio disk, its API port forwarded."""
    try:
        ensure_qemu()
    except PvpyError as e:
        pytest.skip(f"qemu-system-aarch64 cannot be installed: {e}")
    copy = tmp_path / "image"  # the guest writes its storage: keep the fixture's clean
    copy.mkdir()
    shutil.copy(image.out / "image.json", copy)
    subprocess.run(["cp", "--sparse=always", str(image.disk), str(copy / image.disk.name)],
                   check=True)  # fmt: skip
    port = free_port()
    argv = qemu_argv(copy, port)
    assert "-bios" not in argv and argv[argv.index("-append") + 1].startswith(
        f"console={image.board.get('qemu')['console']} ")  # fmt: skip
    wait_for_other_qemu()
    with Machine(copy, port=port, log_path=tmp_path / "console.log", no_reboot=True) as machine:
        yield machine, port


@qemu
@pytest.mark.timeout(900)
def test_image_kernel_and_initrd_boot_pvpy(image: ImageBuild,
                                           booted: tuple[Machine, int]) -> None:  # fmt: skip

    m, port = booted
    m.wait_for(r'"event": "modules loaded"', BOOT_TIMEOUT)
    m.wait_for(r'"device": "/dev/vda4".*"spec": "LABEL=pvstorage".*"event": "storage mounted"',
               60)  # fmt: skip
    m.wait_for(r'"mode": "dhcp", "interface": "eth0".*"event": "network configured"', 60)
    m.wait_for(r'"revision": 1, "trying": false, "failed_try": null, "event": "boot choice"', 60)
    m.wait_for(r'"revision": 1, "trying": false, "event": "booting revision"', BOOT_TIMEOUT)
    m.wait_for(r'"name": "hostos", "status": "STARTED"', BOOT_TIMEOUT)
    m.wait_for(r'"name": "web", "status": "READY"', BOOT_TIMEOUT)
    # The API through the DHCP-configured interface and the forwarded port.
    credentials = image.out / "api-token"
    deadline = time.monotonic() + 120
    while True:
        status = apiclient.api_or_none(f"https://127.0.0.1:{port}", credentials, "/v1/status")
        if status and status["all_goals_met"]:
            break
        assert m.running() and time.monotonic() < deadline, "the API did not answer"
        time.sleep(1)
    assert status["pid"] == 1 and status["revision"] == 1  # pvpy init is PID 1
    states = {c["name"]: c["status"] for c in status["containers"]}
    assert states == {"hostos": "STARTED", "hello": "STARTED", "web": "READY"}
    assert m.find(r"Traceback") is None, "a Python traceback on the console"


def api(port: int, credentials: Path, path: str, method: str = "GET") -> Any:
    """The guest's API over the forwarded port (None while it does not answer)."""
    return apiclient.api_or_none(f"https://127.0.0.1:{port}", credentials, path, method)


def settled(m: Machine, port: int, credentials: Path, revision: int) -> Any:
    """/v1/status once the guest runs ``revision`` with all goals met, nothing under way."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        status = api(port, credentials, "/v1/status")
        if (status and status["all_goals_met"] and status["updating"] is None
                and not status["pending"] and status["revision"] == revision):  # fmt: skip
            return status
        assert m.running() and time.monotonic() < deadline, f"not settled on {revision}"
        time.sleep(2)


@qemu
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("image", ["rpi4-tryboot"], indirect=True)
def test_bsp_update_on_a_kernel_that_cannot_tryboot(image: ImageBuild, tmp_path: Path) -> None:
    """A new initrd pushed into the rpi4-tryboot image booted on QEMU virt: PID 1 writes it
    into boot partition B (a child mounts it vfat), sets pv_try, reboots with
    "0 tryboot". QEMU's direct kernel boot has no tryboot (nor has Debian's kernel
    a way to pass the flag): the firmware's stand-in boots A again, exactly the
    case of a Pi running Debian's kernel. PID 1 sees pv_try pending without the
    device-tree flag: ERROR with that reason, pv_try cleared, revision 1 runs on.
    Read back from the host after power-off: B holds the new initrd and a
    cmdline.txt naming revision 2; autoboot.txt still names A."""
    from tests.qemu_guest import cpio, derive_revision

    try:
        ensure_qemu()
    except PvpyError as e:
        pytest.skip(f"qemu-system-aarch64 cannot be installed: {e}")
    copy = tmp_path / "image"
    copy.mkdir()
    shutil.copy(image.out / "image.json", copy)
    disk = copy / image.disk.name
    subprocess.run(["cp", "--sparse=always", str(image.disk), str(disk)], check=True)
    credentials = image.out / "api-token"
    assert image.key is not None
    note = cpio(tmp_path / "note", {"pvpy-update-note": "revision 2\n"})
    new_initrd: dict[str, Any] = {}

    def add_note(doc: dict[str, Any], objects: ObjectStore) -> None:
        data = (image.revision_dir / "objects" / doc["bsp"]["initrd"]["sha256"]).read_bytes()
        new_initrd.update(sha256=objects.put_bytes(data + note), size=len(data) + len(note))
        doc["bsp"]["initrd"] = dict(new_initrd)

    rev = derive_revision(image.revision_dir, tmp_path / "rev2", 2, image.key, add_note)
    port = free_port()
    wait_for_other_qemu()
    with Machine(copy, port=port, log_path=tmp_path / "console.log") as m:
        settled(m, port, credentials, 1)
        m.wait_for(r'"device": "/dev/vda1", "target": "/run/pvpy-config".*"config partition '
                   r'mounted"', 5)  # fmt: skip
        mark = len(m.lines)
        push = subprocess.run(
            [sys.executable, "-m", "pvpy", "device", "push", f"https://127.0.0.1:{port}", str(rev),
             "--token-file", str(image.out / "api-token"), "--no-wait"],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert push.returncode == 0, push.stderr
        i = m.wait_for(r'"reason": "BSP changed: writing the try boot partition"', 300, mark)
        i = m.wait_for(r'"reason": "update to revision 2", "argument": "0 tryboot", '
                       r'"event": "shutdown requested"', 600, i)  # fmt: skip
        i = m.wait_for(r'"event": "goodbye"', 120, i)
        assert m.find(r"reboot\(2\) with an argument failed", i) is None
        # The reboot: the same kernel of partition A (QEMU has no tryboot).
        i = m.wait_for(r'"event": "modules loaded"', BOOT_TIMEOUT, i)
        m.wait_for(
            r'"revision": 1, "trying": false, "failed_try": 2, "event": "boot choice"', 60, i
        )
        status = settled(m, port, credentials, 1)
        assert (status["committed"], status["try"]) == (1, None), status
        record = api(port, credentials, "/v1/revisions/2")
        assert (record["status"], record["kind"]) == ("ERROR", "reboot"), record
        assert "the firmware did not try-boot" in record["reason"], record
        assert m.find(r"Traceback", mark) is None, "a Python traceback on the console"
        assert api(port, credentials, "/v1/commands/poweroff", "POST") == {"command": "poweroff"}
        m.wait_for(r'"action": "poweroff", "event": "goodbye"', 120, i)
        deadline = time.monotonic() + 120
        while m.running() and time.monotonic() < deadline:
            time.sleep(1)
        assert not m.running(), "QEMU did not end after the power-off"
    # From the host: B holds revision 2's boot files, A and autoboot.txt revision 1's.
    initrd = fat_read(disk, 3, RPI_INITRD)
    assert hashlib.sha256(initrd).hexdigest() == new_initrd["sha256"]
    assert fat_read(disk, 3, RPI_CMDLINE).decode().split()[-1] == "pv_rev=2"
    assert fat_read(disk, 2, RPI_CMDLINE).decode().split()[-1] == "pv_rev=1"
    assert fat_read(disk, 1, AUTOBOOT) == autoboot_text(2, 3).encode()
    env = fat_read(disk, 1, ENV_FILE).decode()
    assert "pv_rev=1" in env.splitlines() and "pv_try" not in env, env
