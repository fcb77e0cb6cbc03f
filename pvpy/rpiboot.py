"""Raspberry Pi boot media: the files of the config and boot partitions, as bytes.

Shared by both sides, so the factory image and an update lay a partition out
alike. Two ways to boot a Pi:

- **U-Boot** (the default; boards/rpi3, boards/rpi4): one FAT partition holds the
  firmware, ``config.txt`` (``kernel=u-boot.bin``: ``uboot_config_txt``), Debian's
  U-Boot, the boot script (``boot.scr``), U-Boot's environment ``uboot.env`` and
  ``pvrev.env``, the committed revision that survives a torn ``uboot.env``
  (``committed_text``); the kernel, initramfs and device tree are loaded by the
  boot script from the storage, as on qemu-arm64. On the device the
  ``uboot-fat`` boot environment (``pvpy.device.bootenv.ubootfat``) keeps both
  files.
- **Tryboot** (boards/rpi4-tryboot, boards/rpi5: for the Raspberry Pi kernel):
  ``pvpy image build`` fills the config partition (``config_partition_files``)
  and boot A and B (``boot_files``) through mtools; on the device, the ``rpi``
  boot environment (``pvpy.device.bootenv.rpi``) keeps autoboot.txt and pvpy.env,
  and the update child writes ``boot_files`` into the try partition
  (``pvpy.device.board.rpi.write_boot_partition``).

Formats only: no I/O here.

Standard library only (the device side runs it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from pvpy import bootvars
from pvpy.errors import DeviceError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "AUTOBOOT", "BOOT_SCRIPT", "CMDLINE", "COMMITTED", "CONFIG", "ENV_FILE", "INITRD", "KERNEL",
    "PARTITION", "UBOOT_BIN", "UBOOT_DEFAULTS", "UBOOT_ENV", "UBOOT_ENV_SIZE", "autoboot_text",
    "boot_files", "cmdline_txt", "committed_text", "config_partition_files", "config_txt",
    "parse_autoboot_partition", "uboot_config_txt",
]  # fmt: skip

KERNEL = "vmlinuz"  # names in a boot partition (config.txt points at them)
INITRD = "initrd.img"
CONFIG = "config.txt"
CMDLINE = "cmdline.txt"
AUTOBOOT = "autoboot.txt"  # on the config partition: the firmware's A/B choice
ENV_FILE = "pvpy.env"  # beside it: pvpy's boot variables
AUTOBOOT_MAX = 512  # the firmware reads no more of autoboot.txt
PARTITION = "rpi_boot_partition"  # pvpy.env: the partition holding pv_rev's boot files

# U-Boot on the Pi: the files of its one FAT partition (8.3 names: U-Boot reads them).
UBOOT_BIN = "u-boot.bin"  # config.txt's kernel=
BOOT_SCRIPT = "boot.scr"  # what the board's bootcmd sources (mkimage -T script)
# Debian's u-boot-rpi (rpi_3, rpi_4, rpi_arm64 alike): CONFIG_ENV_IS_IN_FAT, mmc 0:1,
# CONFIG_ENV_FAT_FILE "uboot.env", CONFIG_ENV_SIZE 0x4000, no redundant copy.
UBOOT_ENV = "uboot.env"
UBOOT_ENV_SIZE = 0x4000
# U-Boot's built-in environment with the board's settings, as ``name=value`` lines
# (the format of fw_setenv -f's u-boot-initial-env): what pvpy starts a new
# uboot.env from when the old one is torn. Read only by Linux: a long name is fine.
UBOOT_DEFAULTS = "u-boot-initial-env"
COMMITTED = "pvrev.env"  # ``pv_rev=N``: the committed revision when uboot.env is torn


def autoboot_text(committed: int, trying: int) -> str:
    text = f"[all]\ntryboot_a_b=1\nboot_partition={committed}\n[tryboot]\nboot_partition={trying}\n"
    assert len(text.encode()) <= AUTOBOOT_MAX
    return text


def parse_autoboot_partition(text: str) -> int | None:
    """The ``boot_partition`` of the ``[all]`` section, if any."""
    section = "all"
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "all" and line.startswith("boot_partition="):
            value = line.partition("=")[2].strip()
            return int(value) if value.isdigit() else None
    return None


def config_partition_files(revision: int, partitions: tuple[int, int]) -> dict[str, bytes]:
    """A new image's config partition: ``revision`` committed on the first boot
    partition (what the ``rpi`` backend writes for ``pv_rev``: pvpy.env, autoboot.txt)."""
    committed, other = partitions
    env = {bootvars.REV: str(revision), PARTITION: str(committed)}
    return {
        ENV_FILE: bootvars.render(env).encode(),
        AUTOBOOT: autoboot_text(committed, other).encode(),
    }


def committed_text(revision: int) -> str:
    """``pvrev.env``: the committed revision, as U-Boot's ``env import -t`` reads it."""
    return bootvars.render({bootvars.REV: str(revision)})


def uboot_config_txt(settings: Sequence[str], dtb_name: str | None) -> str:
    """config.txt of a U-Boot Pi: the board's settings, then U-Boot as the "kernel" and
    the device tree the firmware hands it (U-Boot copies the firmware's settings,
    e.g. the SD card's DMA ranges, into the revision's own tree at boot)."""
    lines = ["# pvpy: the firmware starts U-Boot; U-Boot runs boot.scr"]
    lines += [str(line) for line in settings]
    lines.append(f"kernel={UBOOT_BIN}")
    if dtb_name:
        lines.append(f"device_tree={dtb_name}")
    return "\n".join(lines) + "\n"


def config_txt(settings: Sequence[str], revision: int, dtb_name: str | None) -> str:
    """config.txt of a boot partition: the board's settings, then our file names."""
    lines = [f"# pvpy: boot files of revision {revision} (pvpy writes this partition)"]
    lines += [str(line) for line in settings]
    lines += [f"kernel={KERNEL}", f"initramfs {INITRD} followkernel"]
    if dtb_name:
        lines.append(f"device_tree={dtb_name}")
    return "\n".join(lines) + "\n"


def cmdline_txt(console: str, cmdline: str, revision: int) -> str:
    """cmdline.txt (one line): the console, the revision's command line, ``pv_rev``.

    ``pv_rev`` names the revision whose files this partition holds; PID 1 checks
    it against the boot choice (pvpy.device.board.boot_choice reads it).
    """
    words = [f"console={console}", *cmdline.split(), f"pv_rev={revision}"]
    return " ".join(words) + "\n"


def boot_files(
    state: Mapping[str, Any], objects: Path, settings: Sequence[str], console: str,
    dtb_name: str | None,
) -> dict[str, Path | bytes]:  # fmt: skip
    """What a boot partition holds for ``state`` (a decoded state.json) besides the
    firmware: the BSP's kernel, initrd and device tree objects (files under
    ``objects``) under fixed names, config.txt and cmdline.txt. ``dtb_name`` is
    the name the firmware looks for (used only when the BSP has a device tree).
    Raises DeviceError when the BSP lacks a kernel or initrd.
    """
    revision, bsp = int(state["revision"]), state.get("bsp") or {}
    files: dict[str, Path | bytes] = {}
    for key, name in (("kernel", KERNEL), ("initrd", INITRD)):
        if not isinstance(bsp.get(key), dict):
            raise DeviceError(f"revision {revision}: no bsp.{key} for the boot partition")
        files[name] = Path(objects) / str(bsp[key]["sha256"])
    dtb = dtb_name if isinstance(bsp.get("dtb"), dict) and dtb_name else None
    if dtb:
        files[dtb] = Path(objects) / str(bsp["dtb"]["sha256"])
    files[CONFIG] = config_txt(settings, revision, dtb).encode()
    files[CMDLINE] = cmdline_txt(console, str(bsp.get("cmdline", "")), revision).encode()
    return files
