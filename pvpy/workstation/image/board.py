"""``boards/<name>/board.yaml``: the board description the image build and QEMU read.

Pure reading: no I/O beyond loading the one YAML file. What the Raspberry Pi
boards' partition list means (which MBR partition is config, boot A/B and
storage) is read here too, because PID 1's board file (``device_config``)
carries it; the disk itself is built in ``rpi``. A Pi board boots through
Debian's U-Boot (``bootloader.type: u-boot-rpi``: rpi3, rpi4) or the firmware's
tryboot (``rpi-tryboot``: rpi4-tryboot, rpi5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvpy.errors import ManifestError, UsageError

__all__ = [
    "BOARDS", "PACKAGE", "REPO", "RPI_BOOTLOADER", "RPI_UBOOT", "Board", "RpiLayout", "is_rpi",
    "is_rpi_uboot", "load_board", "rpi_dtb_name", "rpi_layout", "size_bytes",
]  # fmt: skip

PACKAGE = Path(__file__).resolve().parents[2]  # pvpy/, copied into the initramfs
REPO = PACKAGE.parent
BOARDS = REPO / "boards"
RPI_BOOTLOADER = "rpi-tryboot"  # bootloader.type of the Pi boards the firmware A/Bs
RPI_UBOOT = "u-boot-rpi"  # bootloader.type of the Pi boards booted through Debian's U-Boot
_SIZE = re.compile(r"^(\d+)([KMG]?)$")


@dataclass(frozen=True)
class Board:
    """``boards/<name>/board.yaml``, the parts the image build and QEMU read."""

    name: str
    dir: Path
    doc: dict[str, Any] = field(repr=False)

    def get(self, *keys: str) -> Any:
        value: Any = self.doc
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                raise ManifestError(f"board {self.name}: missing {'.'.join(keys)}")
            value = value[key]
        return value

    @property
    def u_boot(self) -> Path:
        return Path(self.get("bootloader", "binary"))

    def device_config(self) -> dict[str, Any]:
        """What PID 1 reads in board mode (``pvpy.device.board.BoardConfig``)."""
        config = {
            "name": self.name,
            "storage": self.doc.get("storage", "PARTLABEL=storage"),
            "modules_on_demand": list(self.doc.get("modules_on_demand", [])),
            "network": dict(self.doc.get("network") or {}),
        }
        if is_rpi_uboot(self):  # uboot.env and pvrev.env on the first FAT partition
            config["rpi"] = {"boot": "u-boot", "config_partition": rpi_layout(self).config}
        elif is_rpi(self):  # what PID 1 needs for tryboot and to write a try partition
            layout = rpi_layout(self)
            config["rpi"] = {
                "config_partition": layout.config,
                "boot_partitions": list(layout.boot),
                "config_txt": [str(line) for line in self.get("bootloader", "config")],
                "console": str(self.get("console")),
                "dtb": rpi_dtb_name(self),
            }
        return config


def load_board(name: str) -> Board:
    """A board by name (``boards/<name>``) or directory. Raises UsageError/ManifestError."""
    import yaml

    path = Path(name) if "/" in name else BOARDS / name
    try:
        doc = yaml.safe_load((path / "board.yaml").read_text())
    except OSError as e:
        known = sorted(p.parent.name for p in BOARDS.glob("*/board.yaml"))
        raise UsageError(f"no board {name!r} ({e.strerror}); boards: {known}") from e
    except yaml.YAMLError as e:
        raise ManifestError(f"{path / 'board.yaml'}: invalid YAML: {e}") from e
    if not isinstance(doc, dict) or doc.get("name") != path.name:
        raise ManifestError(f"{path / 'board.yaml'}: a mapping with name: {path.name}")
    return Board(name=path.name, dir=path, doc=doc)


def size_bytes(text: str | int) -> int:
    """A partition size of board.yaml (``512M``, ``16K``, bytes) in bytes. Raises ManifestError."""
    match = _SIZE.match(str(text).strip())
    if not match:
        raise ManifestError(f"not a size: {text!r} (use e.g. 512M)")
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)]


# -- Raspberry Pi boards ---------------------------------------------------------------------


def _bootloader_type(board: Board) -> object:
    return (board.doc.get("bootloader") or {}).get("type")


def is_rpi(board: Board) -> bool:
    """A Raspberry Pi board (MBR, FAT), whichever way it boots."""
    return _bootloader_type(board) in (RPI_BOOTLOADER, RPI_UBOOT)


def is_rpi_uboot(board: Board) -> bool:
    """A Raspberry Pi booted through Debian's U-Boot (its env in uboot.env on FAT)."""
    return _bootloader_type(board) == RPI_UBOOT


@dataclass(frozen=True)
class RpiLayout:
    """Which MBR partition (1-4) is which, from the order of the board's partitions."""

    config: int  # the first FAT partition: autoboot.txt, or U-Boot and uboot.env
    boot: tuple[int, ...]  # tryboot's A, B (autoboot.txt's boot_partition values); U-Boot: ()
    storage: int


def rpi_layout(board: Board) -> RpiLayout:
    """Raises ManifestError unless the board lists config, two boot and one ext4 partition
    (tryboot), or one FAT and one ext4 partition (U-Boot)."""
    parts = board.get("partitions")
    if is_rpi_uboot(board):
        fats = [i + 1 for i, p in enumerate(parts) if p.get("fs") == "vfat"]
        ext4 = [i + 1 for i, p in enumerate(parts) if p.get("fs") == "ext4"]
        if len(parts) > 4 or fats[:1] != [1] or len(fats) != 1 or len(ext4) != 1:
            raise ManifestError(
                f"board {board.name}: MBR partitions must be a first vfat one (firmware, "
                "U-Boot, uboot.env) and one ext4 (at most 4)"
            )
        return RpiLayout(config=1, boot=(), storage=ext4[0])
    content = [str(p.get("content", "")) for p in parts]
    boots = [i + 1 for i, c in enumerate(content) if c == "boot"]
    storage = [i + 1 for i, p in enumerate(parts) if p.get("fs") == "ext4"]
    if len(parts) > 4 or content[:1] != ["config"] or len(boots) != 2 or len(storage) != 1:
        raise ManifestError(
            f"board {board.name}: MBR partitions must be a first 'content: config' one, two "
            "'content: boot' ones and one ext4 (at most 4)"
        )
    return RpiLayout(config=1, boot=(boots[0], boots[1]), storage=storage[0])


def rpi_dtb_name(board: Board) -> str | None:
    """The device tree's name in a boot partition (the firmware knows it by name)."""
    dtb = board.doc.get("dtb")
    return Path(str(dtb)).name if dtb else None
