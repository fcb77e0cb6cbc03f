"""The qemu-arm64 disk (U-Boot boards): GPT, the storage partition, U-Boot's env flash.

The boot script (``boards/<name>/boot.cmd`` as ``/boot.scr``) is on the storage
partition already (``provision_storage``); U-Boot finds it with the board's
``bootcmd``, written into the env flash QEMU maps read-only on pflash unit 1.
No loop device and no mount: ext4 is filled with ``mkfs.ext4 -d``, partition
images are placed with dd.

U-Boot's environment as bytes (``default_env``, ``board_env``, ``env_image``)
is shared with the Raspberry Pi's ``uboot.env`` (``.rpi``).
"""

from __future__ import annotations

import zlib
from pathlib import Path

from pvpy import _run
from pvpy.errors import ManifestError
from pvpy.workstation.image.board import size_bytes
from pvpy.workstation.image.context import ImageBuild, write_image_manifest

__all__ = [
    "board_env", "build_disk", "build_env_flash", "default_env", "env_image", "make_boot_script",
    "write_manifest",
]  # fmt: skip


def build_disk(b: ImageBuild) -> None:
    """GPT with the board's partitions; ext4 filled from a directory (mkfs.ext4 -d)."""
    parts = b.board.get("partitions")
    table = ["label: gpt"]
    images: list[tuple[int, Path]] = []
    start = 1 << 20
    for part in parts:
        size = size_bytes(part["size"])
        image = b.work / f"part-{part['name']}.img"
        image.unlink(missing_ok=True)
        if part.get("fs") == "ext4":
            label = part.get("label", part["name"])
            _run.run(["mkfs.ext4", "-q", "-F", "-L", label, "-d", str(b.storage), str(image),
                      str(size // 1024)], timeout=600)  # fmt: skip
        else:
            image.write_bytes(str(part.get("content", "")).encode().ljust(512, b"\0"))
        table.append(f"start={start // 512}, size={size // 512}, type=linux, name={part['name']}")
        images.append((start, image))
        start += size
    b.disk.unlink(missing_ok=True)
    with open(b.disk, "wb") as f:
        f.truncate(start + (1 << 20))  # + the backup GPT
    _run.run(["sfdisk", "-q", str(b.disk)], input=("\n".join(table) + "\n").encode())
    for offset, image in images:
        _run.run(["dd", f"if={image}", f"of={b.disk}", "bs=1M", f"seek={offset}",
                  "oflag=seek_bytes", "conv=notrunc,sparse", "status=none"])  # fmt: skip
        image.unlink()


def default_env(u_boot: Path) -> dict[str, str]:
    """U-Boot's built-in environment, out of its binary: the NUL-separated block from
    ``bootcmd=run distro_bootcmd`` to ``\\0\\0`` (Debian's builds all start with it).
    Raises ManifestError when it is not there."""
    blob = u_boot.read_bytes()
    try:
        start = blob.index(b"bootcmd=run distro_bootcmd\0")
    except ValueError as e:
        raise ManifestError(f"{u_boot}: no default environment found") from e
    env: dict[str, str] = {}
    for entry in blob[start : blob.index(b"\0\0", start)].split(b"\0"):
        name, _, value = entry.decode().partition("=")
        env[name] = value
    return env


def board_env(b: ImageBuild, u_boot: Path) -> dict[str, str]:
    """The environment a board's U-Boot boots with: a valid env *replaces* U-Boot's
    built-in one, so its defaults, then the board's ``bootloader.env`` overrides."""
    env = default_env(u_boot)
    env.update({str(k): str(v) for k, v in b.board.get("bootloader", "env").items()})
    return env


def env_image(board: str, env: dict[str, str], size: int) -> bytes:
    """One copy of an environment, as U-Boot and fw_printenv read it: crc32 (LE) of
    the data, then ``name=value\\0``... sorted, a ``\\0``, zero padding to ``size``.
    Raises ManifestError when it does not fit."""
    data = b"".join(f"{k}={v}".encode() + b"\0" for k, v in sorted(env.items())) + b"\0"
    if len(data) > size - 4:
        raise ManifestError(f"board {board}: the U-Boot env exceeds {size} bytes")
    data = data.ljust(size - 4, b"\0")
    return zlib.crc32(data).to_bytes(4, "little") + data


def make_boot_script(source: Path, out: Path) -> None:
    """``source`` (U-Boot commands) as a script image U-Boot's ``source`` runs."""
    _run.run(["mkimage", "-A", "arm64", "-T", "script", "-C", "none", "-n", "pvpy boot",
              "-d", str(source), str(out)])  # fmt: skip


def build_env_flash(b: ImageBuild) -> None:
    """U-Boot's env flash for qemu_arm64: the board's environment (``board_env``), one
    copy at offset 0, the rest of the flash erased (0xff)."""
    env = board_env(b, b.board.u_boot)
    flash = env_image(b.board.name, env, int(b.board.get("bootloader", "env_size")))
    flash = flash.ljust(int(b.board.get("bootloader", "env_flash_size")), b"\xff")  # erased
    (b.out / "uboot-env.img").write_bytes(flash)


def write_manifest(b: ImageBuild) -> None:
    """``image.json`` of a U-Boot image: its env flash and the U-Boot QEMU runs."""
    write_image_manifest(b, env_flash="uboot-env.img", u_boot=str(b.board.u_boot))
