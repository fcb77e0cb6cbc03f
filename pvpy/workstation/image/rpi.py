"""The Raspberry Pi disk (boards/rpi4, boards/rpi5): MBR, FAT config and boot A/B, ext4 storage.

The Pi's firmware boots from MBR + FAT and reads no boot script: its A/B is
tryboot (``pvpy.device.bootenv.rpi``). The disk, in the order of the board's
partitions: "config" (FAT16, first: the bootloader reads autoboot.txt only
there) with autoboot.txt and pvpy.env as the device's ``RpiTryboot`` backend
writes them (``pvpy.rpiboot``, shared), so the device starts from exactly what
the backend writes; boot A and B (FAT32) with the firmware files, config.txt,
cmdline.txt and the factory revision's BSP objects under fixed names (both: a
stray tryboot lands on a bootable partition); the ext4 storage. FAT is filled
with mtools, ext4 with ``mkfs.ext4 -d``: still no loop device and no mount.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from pvpy import _run, paths, rpiboot
from pvpy.errors import DeviceError, ManifestError
from pvpy.log import get_logger
from pvpy.workstation.image.board import (
    RPI_BOOTLOADER,
    Board,
    rpi_dtb_name,
    rpi_layout,
    size_bytes,
)
from pvpy.workstation.image.context import ImageBuild, write_image_manifest

__all__ = [
    "RPI_CMDLINE", "RPI_CONFIG", "RPI_INITRD", "RPI_KERNEL", "build_rpi_disk", "find_dtb",
    "make_fat", "rpi_boot_files", "write_mbr_disk", "write_rpi_manifest",
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


def build_rpi_disk(b: ImageBuild) -> None:
    """MBR: config (autoboot.txt, pvpy.env), boot A and B, storage (see above)."""
    layout = rpi_layout(b.board)
    config = b.work / "config"
    shutil.rmtree(config, ignore_errors=True)
    config.mkdir(parents=True)
    # The revision committed on boot partition A: pvpy.env and autoboot.txt as the
    # device's rpi backend writes them.
    for name, data in rpiboot.config_partition_files(b.revision, layout.boot).items():
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
    boots the committed boot partition's kernel directly)."""
    layout = rpi_layout(b.board)
    write_image_manifest(
        b,
        boot=RPI_BOOTLOADER,
        partitions={"config": layout.config, "boot": list(layout.boot),
                    "storage": layout.storage},
        boot_files={"kernel": RPI_KERNEL, "initrd": RPI_INITRD, "cmdline": RPI_CMDLINE,
                    "config": RPI_CONFIG},
        dtb=b.dtb.name if b.dtb else None,
    )  # fmt: skip
