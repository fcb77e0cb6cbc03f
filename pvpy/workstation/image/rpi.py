"""The Raspberry Pi disks: MBR, FAT, ext4 storage; through U-Boot or the firmware's tryboot.

**U-Boot** (``bootloader.type: u-boot-rpi``: boards/rpi3, boards/rpi4, the
default): p1 FAT32 holds what the firmware reads (bootcode.bin/start*.elf,
fixup*.dat, ``config.txt`` with ``kernel=u-boot.bin`` and the device tree), Debian's
U-Boot (``u-boot-rpi``, fetched and extracted here), the board's boot script as
``boot.scr`` (the one qemu-arm64 runs), U-Boot's environment ``uboot.env`` (its
built-in defaults, the board's settings and ``pv_rev``: 16 KiB, one copy, where
U-Boot's CONFIG_ENV_IS_IN_FAT looks), the same as text (``u-boot-initial-env``:
what the device rewrites a torn ``uboot.env`` from) and ``pvrev.env`` (the
committed revision when ``uboot.env`` is torn). p2 is the ext4 storage: the boot
script loads each revision's kernel, initramfs and device tree from its trail.

**Tryboot** (``bootloader.type: rpi-tryboot``: boards/rpi4-tryboot, boards/rpi5,
for the Raspberry Pi kernel, which passes the firmware its one-shot flag): the
firmware reads no boot script, its A/B is tryboot (``pvpy.device.bootenv.rpi``).
The disk, in the order of the board's partitions: "config" (FAT16, first: the
bootloader reads autoboot.txt only there) with autoboot.txt and pvpy.env as the
device's ``RpiTryboot`` backend writes them (``pvpy.rpiboot``, shared), so the
device starts from exactly what the backend writes; boot A and B (FAT32) with the
firmware files, config.txt, cmdline.txt and the factory revision's BSP objects
under fixed names (both: a stray tryboot lands on a bootable partition); the ext4
storage.

FAT is filled with mtools, ext4 with ``mkfs.ext4 -d``: no loop device and no mount.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from pvpy import _run, bootvars, paths, rpiboot
from pvpy.errors import CommandError, DeviceError, ManifestError
from pvpy.log import get_logger
from pvpy.workstation.image.board import (
    RPI_BOOTLOADER,
    RPI_UBOOT,
    Board,
    is_rpi_uboot,
    rpi_dtb_name,
    rpi_layout,
    size_bytes,
)
from pvpy.workstation.image.context import ImageBuild, write_image_manifest
from pvpy.workstation.image.uboot import board_env, env_image, make_boot_script

__all__ = [
    "RPI_CMDLINE", "RPI_CONFIG", "RPI_INITRD", "RPI_KERNEL", "build_rpi_disk", "fetch_u_boot_rpi",
    "find_dtb", "make_fat", "rpi_boot_files", "rpi_uboot_files", "write_mbr_disk",
    "write_rpi_manifest", "write_rpi_uboot_disk",
]  # fmt: skip

log = get_logger("image")

RPI_KERNEL = rpiboot.KERNEL  # names in a boot partition (config.txt points at them)
RPI_INITRD = rpiboot.INITRD
RPI_CONFIG = rpiboot.CONFIG
RPI_CMDLINE = rpiboot.CMDLINE
MBR_START = 1 << 20  # first partition at 1 MiB (SD erase-block alignment)


def rpi_boot_files(board: Board, revision_dir: Path, firmware: Path) -> dict[str, Path | bytes]:
    """What a boot partition holds for the revision in ``revision_dir`` (its
    state.json and objects/): the board's firmware files, then what
    ``pvpy.rpiboot.boot_files`` lays out (the device writes the same for an update).
    Raises ManifestError when the board's firmware or the revision's BSP lacks a file.
    """
    from pvpy.state import canonical

    state = canonical.decode((revision_dir / paths.STATE_FILE).read_bytes())
    files: dict[str, Path | bytes] = {}
    fw = board.get("bootloader", "firmware")
    for name in fw.get("files") or []:
        path = firmware / str(fw["dir"]) / str(name)
        if not path.is_file():
            raise ManifestError(f"board {board.name}: no {name} in {fw['package']}")
        files[str(name)] = path
    try:
        files.update(rpiboot.boot_files(
            state, revision_dir / "objects", board.get("bootloader", "config"),
            str(board.get("console")), rpi_dtb_name(board),
        ))  # fmt: skip
    except DeviceError as e:
        raise ManifestError(str(e)) from e
    return files


def make_fat(image: Path, size: int, label: str, bits: int,
             files: dict[str, Path | bytes], work: Path) -> None:  # fmt: skip
    """A FAT``bits`` filesystem image of ``size`` bytes holding ``files`` (name ->
    source file or content) in its root: mkfs.vfat -C, then mcopy. Raises
    ManifestError when they cannot fit, CommandError when a tool fails."""
    need = sum(len(c) if isinstance(c, bytes) else c.stat().st_size for c in files.values())
    if need > size * 0.95:  # FAT tables and cluster slack
        raise ManifestError(f"FAT partition {label}: {need >> 20} MiB of files in {size >> 20} MiB")
    image.unlink(missing_ok=True)
    # --invariant: fixed volume id and times, like the reproducible squashfs images.
    _run.run(["mkfs.vfat", "-C", "-F", str(bits), "-n", label, "--invariant", str(image),
              str(size // 1024)])  # fmt: skip
    staged = work / f"{image.name}.files"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    for name, content in sorted(files.items()):
        src = content if isinstance(content, Path) else staged / name
        if isinstance(content, bytes):
            src.write_bytes(content)
        _run.run(["mcopy", "-i", str(image), "-o", str(src), f"::/{name}"],
                 env={"MTOOLS_SKIP_CHECK": "1"}, timeout=600)  # fmt: skip
    shutil.rmtree(staged)


def write_mbr_disk(disk: Path, parts: list[tuple[int, str, Path]]) -> None:
    """``disk``: an MBR (sfdisk) with one primary partition per (size, type, image),
    from 1 MiB on, each image placed with dd (sparse) and then removed."""
    table = ["label: dos"]
    start = MBR_START
    placed: list[tuple[int, Path]] = []
    for size, mbr_type, image in parts:
        table.append(f"start={start // 512}, size={size // 512}, type={mbr_type}")
        placed.append((start, image))
        start += size
    disk.unlink(missing_ok=True)
    with open(disk, "wb") as f:
        f.truncate(start)
    _run.run(["sfdisk", "-q", str(disk)], input=("\n".join(table) + "\n").encode())
    for offset, image in placed:
        _run.run(["dd", f"if={image}", f"of={disk}", "bs=1M", f"seek={offset}",
                  "oflag=seek_bytes", "conv=notrunc,sparse", "status=none"])  # fmt: skip
        image.unlink()


def find_dtb(b: ImageBuild) -> None:
    """The board's device tree in the kernel package; a BSP object of the revision.

    A board with ``dtb_required: false`` (rpi5: bookworm's kernel has no BCM2712
    tree) builds without one, with a warning: such an image does not boot there.
    """
    rel = b.board.doc.get("dtb")
    if not rel:
        return
    path = b.kernel_root / "usr/lib" / f"linux-image-{b.kernel_version}" / str(rel)
    if path.is_file():
        b.dtb = path
        return
    problem = f"{rel} is not in {b.kernel_package}"
    if b.board.doc.get("dtb_required", True):
        raise ManifestError(f"board {b.board.name}: {problem}")
    log.warning("no device tree: the image will not boot on the board", board=b.board.name,
                problem=problem)  # fmt: skip
    print(f"pvpy: WARNING: {problem}: this {b.board.name} image cannot boot on the board "
          f"(see boards/{b.board.name}/board.yaml)", file=sys.stderr)  # fmt: skip


def fetch_u_boot_rpi(b: ImageBuild) -> Path:
    """Debian's ``u-boot-rpi`` (arm64: rpi_3, rpi_4 and rpi_arm64 builds) in an apt
    tree of its own, extracted once per version; the board's ``bootloader.binary`` in it.
    Raises CommandError (fetch), ManifestError (no such binary)."""
    from pvpy.workstation.image.packages import FETCH_DEBS, deb_version

    package = str(b.board.get("bootloader", "package"))
    apt = b.cache / "apt-arm64-u-boot"
    _run.run(["sh", str(FETCH_DEBS), str(apt), "-", package], timeout=1800)
    versions = dict(line.split()[:2] for line in (apt / "debs.list").read_text().splitlines())
    if package not in versions:
        raise CommandError(["fetch-debs"], 1, f"{package}: not resolved in {apt}")
    root = b.cache / "u-boot" / f"{package}_{versions[package]}"
    if not (root / ".done").exists():
        debs = [d for d in apt.glob(f"archives/{package}_*.deb")
                if deb_version(d) == versions[package]]  # fmt: skip
        if not debs:
            raise CommandError(["fetch-debs"], 1, f"{package} {versions[package]}: no .deb")
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        _run.run(["dpkg-deb", "-x", str(debs[0]), str(root)])
        (root / ".done").touch()
    binary = root / str(b.board.get("bootloader", "binary")).lstrip("/")
    if not binary.is_file():
        raise ManifestError(f"board {b.board.name}: no {binary.relative_to(root)} in {package}")
    return binary


def rpi_uboot_files(b: ImageBuild, u_boot: Path, boot_script: Path) -> dict[str, Path | bytes]:
    """The FAT partition of a U-Boot Pi (see the module docstring). ``boot_script``
    is the board's script made by mkimage; U-Boot's environment is its built-in one
    with the board's settings and the factory revision committed."""
    fw = b.board.get("bootloader", "firmware")
    files: dict[str, Path | bytes] = {}
    for name in fw.get("files") or []:
        path = b.firmware_root / str(fw["dir"]) / str(name)
        if not path.is_file():
            raise ManifestError(f"board {b.board.name}: no {name} in {fw['package']}")
        files[str(name)] = path
    dtb = rpi_dtb_name(b.board) if b.dtb is not None else None
    if b.dtb is not None and dtb:
        files[dtb] = b.dtb  # what the firmware hands U-Boot (the revision's own is on the storage)
    files[rpiboot.CONFIG] = rpiboot.uboot_config_txt(b.board.get("bootloader", "config"),
                                                     dtb).encode()  # fmt: skip
    files[rpiboot.UBOOT_BIN] = u_boot
    files[rpiboot.BOOT_SCRIPT] = boot_script
    env = board_env(b, u_boot)
    size = int(b.board.doc["bootloader"].get("env_size", rpiboot.UBOOT_ENV_SIZE))
    if size != rpiboot.UBOOT_ENV_SIZE:  # the device reads uboot.env with Debian's size
        raise ManifestError(f"board {b.board.name}: env_size must be {rpiboot.UBOOT_ENV_SIZE:#x}")
    files[rpiboot.UBOOT_DEFAULTS] = "".join(f"{k}={v}\n" for k, v in sorted(env.items())).encode()
    files[rpiboot.UBOOT_ENV] = env_image(b.board.name, {**env, bootvars.REV: str(b.revision)},
                                         size)  # fmt: skip
    files[rpiboot.COMMITTED] = rpiboot.committed_text(b.revision).encode()
    return files


def write_rpi_uboot_disk(b: ImageBuild, u_boot: Path) -> None:
    """MBR: the FAT partition of ``rpi_uboot_files`` with ``u_boot``, the storage.
    Needs mkimage (u-boot-tools)."""
    layout = rpi_layout(b.board)
    script = b.work / rpiboot.BOOT_SCRIPT
    make_boot_script(b.board.dir / str(b.board.get("bootloader", "boot_script")), script)
    fat = rpi_uboot_files(b, u_boot, script)
    parts: list[tuple[int, str, Path]] = []
    for number, part in enumerate(b.board.get("partitions"), 1):
        size, image = size_bytes(part["size"]), b.work / f"part{number}.img"
        label = str(part.get("label", part["name"]))
        if number == layout.config:
            make_fat(image, size, label.upper()[:11], int(part.get("fat", 32)), fat, b.work)
        else:
            _run.run(["mkfs.ext4", "-q", "-F", "-L", label, "-d", str(b.storage), str(image),
                      str(size // 1024)], timeout=600)  # fmt: skip
        parts.append((size, str(part.get("type", "83")), image))
    write_mbr_disk(b.disk, parts)


def build_rpi_disk(b: ImageBuild) -> None:
    """The board's disk: through U-Boot (fetched here), or config (autoboot.txt,
    pvpy.env), boot A and B, storage for tryboot (see above)."""
    if is_rpi_uboot(b.board):
        from pvpy.workstation.image.packages import ensure_debian_packages

        ensure_debian_packages({"mkimage": "u-boot-tools"})
        write_rpi_uboot_disk(b, fetch_u_boot_rpi(b))
        return
    layout = rpi_layout(b.board)
    config = b.work / "config"
    shutil.rmtree(config, ignore_errors=True)
    config.mkdir(parents=True)
    # The revision committed on boot partition A: pvpy.env and autoboot.txt as the
    # device's rpi backend writes them.
    a, b_ = layout.boot
    for name, data in rpiboot.config_partition_files(b.revision, (a, b_)).items():
        (config / name).write_bytes(data)
    boot = rpi_boot_files(b.board, b.revision_dir, b.firmware_root)
    parts: list[tuple[int, str, Path]] = []
    for number, part in enumerate(b.board.get("partitions"), 1):
        size, image = size_bytes(part["size"]), b.work / f"part{number}.img"
        label = str(part.get("label", part["name"]))
        if part.get("fs") == "vfat":
            files: dict[str, Path | bytes] = (
                {p.name: p for p in sorted(config.iterdir())} if number == layout.config
                else boot
            )  # fmt: skip
            make_fat(image, size, label.upper()[:11], int(part.get("fat", 32)), files, b.work)
        elif part.get("fs") == "ext4":
            _run.run(["mkfs.ext4", "-q", "-F", "-L", label, "-d", str(b.storage), str(image),
                      str(size // 1024)], timeout=600)  # fmt: skip
        else:
            raise ManifestError(f"board {b.board.name}: partition {part['name']}: fs vfat or ext4")
        parts.append((size, str(part.get("type", "83")), image))
    write_mbr_disk(b.disk, parts)


def write_rpi_manifest(b: ImageBuild) -> None:
    """``image.json`` of a Pi image: its partitions and boot file names (`pvpy qemu run`
    boots U-Boot as the firmware would, from config.txt; a tryboot image's committed
    boot partition's kernel directly)."""
    layout = rpi_layout(b.board)
    if is_rpi_uboot(b.board):
        write_image_manifest(
            b,
            boot=RPI_UBOOT,
            partitions={"config": layout.config, "storage": layout.storage},
            boot_files={"config": RPI_CONFIG, "u_boot": rpiboot.UBOOT_BIN,
                        "env": rpiboot.UBOOT_ENV, "committed": rpiboot.COMMITTED},
            dtb=b.dtb.name if b.dtb else None,
        )  # fmt: skip
        return
    write_image_manifest(
        b,
        boot=RPI_BOOTLOADER,
        partitions={"config": layout.config, "boot": list(layout.boot),
                    "storage": layout.storage},
        boot_files={"kernel": RPI_KERNEL, "initrd": RPI_INITRD, "cmdline": RPI_CMDLINE,
                    "config": RPI_CONFIG},
        dtb=b.dtb.name if b.dtb else None,
    )  # fmt: skip
