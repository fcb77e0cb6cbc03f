"""``pvpy image build``: a bootable disk image for a board (workstation side).

The pipeline (``build_image``), one step each, in order::

    ensure_host_tools    Debian host packages the build needs (apt-get when missing)
    fetch_packages       the board's arm64 packages, cached (rootfs/fetch-debs)
    extract_packages     dpkg-deb -x into the cache (once per resolved package set)
    build_initramfs      python + pruned stdlib (.pyc) + pvpy + crun + busybox + modules
    build_revision       the spec + bsp (kernel, initrd, cmdline) -> a signed revision
    provision_storage    pvpy's own provisioning (verifies it) + boot.scr + API token
    build_disk           GPT: storage (mkfs.ext4 -d, no mount), pvmarker; placed with dd
    build_env_flash      U-Boot's env flash: its defaults + the board's bootcmd
    write_manifest       image.json, what ``pvpy qemu run`` reads

Raspberry Pi boards (``bootloader.type: rpi-tryboot``: boards/rpi4, boards/rpi5)
run ``RPI_STEPS`` instead: the same packages, initramfs, revision and storage,
plus ``fetch_firmware`` (raspi-firmware, from non-free-firmware) and
``find_dtb`` (the device tree, a BSP object of the revision), and
``build_rpi_disk``: MBR with the tryboot config partition, boot A and B, the
storage (see ``.rpi``).

One module per concern: ``board`` (board.yaml), ``context`` (what the steps
share, image.json), ``packages`` (host tools, Debian arm64 packages),
``modules`` (kernel module load order), ``initramfs``, ``revision`` (factory
revision, updates, provisioning), ``uboot`` (the qemu-arm64 disk) and ``rpi``
(the Raspberry Pi disk). This module holds the step lists and re-exports the
names callers use.

No root-only tricks: no loop device and no mount, so nothing is left behind.
Everything derived from packages is cached under ``cache`` (default
``~/.cache/pvpy``): the initramfs is rebuilt only when the packages, the board
or pvpy's sources change. The output directory holds ``disk.img``,
``uboot-env.img``, ``image.json`` (what ``pvpy qemu run`` reads), the factory
revision (``revision/``), the trust key and the API token.

Updates for an image: ``build_update(IMAGE_DIR, SPEC, OUT)`` builds a spec for
the image's board with the image's BSP objects and key (``build_board_revision``
underneath, which the factory revision uses too): a spec that changes only apps
makes an app-only update, ready for ``pvpy device push``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from pvpy.log import get_logger
from pvpy.workstation.image.board import (
    REPO,
    RPI_BOOTLOADER,
    Board,
    RpiLayout,
    is_rpi,
    load_board,
    rpi_layout,
)
from pvpy.workstation.image.context import IMAGE_MANIFEST, ImageBuild, default_cache
from pvpy.workstation.image.initramfs import build_initramfs
from pvpy.workstation.image.packages import (
    HOST_TOOLS,
    RPI_HOST_TOOLS,
    ensure_debian_packages,
    ensure_host_tools,
    ensure_rpi_host_tools,
    extract_packages,
    fetch_firmware,
    fetch_packages,
)
from pvpy.workstation.image.revision import (
    build_board_revision,
    build_revision,
    build_update,
    provision_storage,
)
from pvpy.workstation.image.rpi import (
    RPI_CMDLINE,
    RPI_CONFIG,
    RPI_INITRD,
    RPI_KERNEL,
    build_rpi_disk,
    find_dtb,
    rpi_boot_files,
    write_rpi_manifest,
)
from pvpy.workstation.image.uboot import build_disk, build_env_flash, write_manifest

__all__ = [
    "DEFAULT_SPEC", "HOST_TOOLS", "IMAGE_MANIFEST", "RPI_BOOTLOADER", "RPI_CMDLINE", "RPI_CONFIG",
    "RPI_HOST_TOOLS", "RPI_INITRD", "RPI_KERNEL", "RPI_STEPS", "STEPS", "Board", "ImageBuild",
    "RpiLayout", "build_board_revision", "build_image", "build_rpi_disk", "build_update",
    "default_cache", "ensure_debian_packages", "is_rpi", "load_board", "rpi_boot_files",
    "rpi_layout", "steps_for", "write_rpi_manifest",
]  # fmt: skip

log = get_logger("image")

DEFAULT_SPEC = REPO / "examples" / "demo" / "spec.yaml"

STEPS: list[Callable[[ImageBuild], None]] = [
    ensure_host_tools, fetch_packages, extract_packages, build_initramfs, build_revision,
    provision_storage, build_disk, build_env_flash, write_manifest,
]  # fmt: skip

RPI_STEPS: list[Callable[[ImageBuild], None]] = [
    ensure_rpi_host_tools, fetch_packages, fetch_firmware, extract_packages, find_dtb,
    build_initramfs, build_revision, provision_storage, build_rpi_disk, write_rpi_manifest,
]  # fmt: skip


def steps_for(board: Board) -> list[Callable[[ImageBuild], None]]:
    """The pipeline of a board: U-Boot (qemu-arm64) or the Pi's tryboot."""
    return RPI_STEPS if is_rpi(board) else STEPS


def build_image(
    board_name: str, out: Path, spec: Path | None = None, key: Path | None = None,
    cache: Path | None = None,
) -> ImageBuild:  # fmt: skip
    """Run the pipeline. ``out`` is a directory, or a ``.img`` path (its directory
    then holds the other files). Raises PvpyError subclasses."""
    board = load_board(board_name)
    out = Path(out)
    disk = out if out.suffix == ".img" else out / "disk.img"
    out = disk.parent
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    b = ImageBuild(board=board, out=out, disk=disk, spec=Path(spec or DEFAULT_SPEC), key=key,
                   cache=Path(cache or default_cache()), work=work)  # fmt: skip
    try:
        for step in steps_for(board):
            started = time.monotonic()
            log.info(step.__name__.replace("_", " "), board=board.name)
            step(b)
            b.timings[step.__name__] = round(time.monotonic() - started, 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return b
