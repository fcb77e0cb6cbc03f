"""Debian packages: the host tools the build runs, and the board's arm64 packages.

The host tools are installed with apt-get when missing (the build's one host
side effect, logged). The board's arm64 packages are fetched into private,
cached apt trees by ``rootfs/fetch-debs`` (the host's dpkg is never touched)
and extracted once per resolved package set.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

from pvpy import _run
from pvpy.errors import CommandError
from pvpy.log import get_logger
from pvpy.workstation.image.board import REPO, is_rpi
from pvpy.workstation.image.context import ImageBuild

__all__ = [
    "FETCH_DEBS", "HOST_TOOLS", "RPI_HOST_TOOLS", "deb_version", "ensure_debian_packages",
    "ensure_host_tools", "ensure_rpi_host_tools", "extract_packages", "fetch_firmware",
    "fetch_packages",
]  # fmt: skip

log = get_logger("image")

FETCH_DEBS = REPO / "rootfs" / "fetch-debs"

# Commands the build runs -> the Debian package that has them.
HOST_TOOLS = {
    "dpkg-deb": "dpkg",
    "readelf": "binutils",
    "cpio": "cpio",
    "mkimage": "u-boot-tools",
    "sfdisk": "fdisk",
    "mkfs.ext4": "e2fsprogs",
    "mksquashfs": "squashfs-tools",
    "busybox": "busybox-static",
}
# What a Raspberry Pi disk needs beyond them (FAT filled without a mount).
RPI_HOST_TOOLS = {"mkfs.vfat": "dosfstools", "mcopy": "mtools", "mdir": "mtools"}

# The kernel's install-time dependencies (and python3's own wrappers): fetched
# because apt resolves them, never extracted.
NOT_EXTRACTED = re.compile(
    r"^(initramfs-tools.*|udev|klibc-utils|libklibc|kmod|adduser|debconf|dpkg|coreutils|tar|"
    r"passwd|libpam.*|libsemanage.*|libaudit.*|logsave|linux-base|cpio|python3|python3-minimal|"
    r"libpython3-stdlib|readline-common|media-types|python3\.11)$"
)


def ensure_debian_packages(commands: dict[str, str], files: dict[str, str] | None = None) -> None:
    """Install the Debian packages of missing commands (and files) with apt-get.

    This is the build's one host side effect; it is logged. Raises CommandError.
    """
    missing = sorted(
        {pkg for cmd, pkg in commands.items() if _run.which(cmd) is None}
        | {pkg for path, pkg in (files or {}).items() if not Path(path).exists()}
    )
    if not missing:
        return
    log.info("installing Debian host packages", packages=missing)
    print(f"pvpy: installing Debian host packages: {' '.join(missing)}", file=sys.stderr)
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    _run.run(["apt-get", "update", "-qq"], env=env, timeout=600)
    _run.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
             env=env, timeout=1800)  # fmt: skip


def ensure_host_tools(b: ImageBuild) -> None:
    """The U-Boot boards' host tools and U-Boot itself (QEMU runs the host's u-boot.bin)."""
    if is_rpi(b.board):  # build_update runs this step for every board
        ensure_rpi_host_tools(b)
        return
    ensure_debian_packages(HOST_TOOLS, {str(b.board.u_boot): b.board.get("bootloader", "package")})


def ensure_rpi_host_tools(b: ImageBuild) -> None:
    tools = {cmd: pkg for cmd, pkg in HOST_TOOLS.items() if cmd != "mkimage"}  # no U-Boot
    ensure_debian_packages({**tools, **RPI_HOST_TOOLS})


def fetch_packages(b: ImageBuild) -> None:
    packages = [str(p) for p in b.board.get("packages")]
    _run.run(["sh", str(FETCH_DEBS), str(b.apt), b.board.get("kernel", "package"), *packages],
             timeout=1800)  # fmt: skip
    b.kernel_package = (b.apt / "kernel-package").read_text().strip()
    b.kernel_version = b.kernel_package.removeprefix("linux-image-")


def extract_packages(b: ImageBuild) -> None:
    """Every fetched .deb of the resolved set into one tree (the kernel apart), once."""
    resolved = (b.apt / "debs.list").read_text()
    key = hashlib.sha256(resolved.encode()).hexdigest()[:16]
    root = b.cache / "extract" / key
    b.packages_root, b.kernel_root = root / "full", root / "kernel"
    if (root / ".done").exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    b.packages_root.mkdir(parents=True)
    b.kernel_root.mkdir()
    for line in resolved.splitlines():
        name, version = line.split()
        if NOT_EXTRACTED.match(name):
            continue
        debs = sorted(b.apt.glob(f"archives/{name}_*_*.deb"))
        deb = next((d for d in debs if deb_version(d) == version), debs[-1] if debs else None)
        if deb is None:
            raise CommandError(["fetch-debs"], 1, f"{name} {version}: no .deb in {b.apt}")
        target = b.kernel_root if name == b.kernel_package else b.packages_root
        _run.run(["dpkg-deb", "-x", str(deb), str(target)])
    _merge_usr(b.packages_root)
    (root / ".done").touch()


def fetch_firmware(b: ImageBuild) -> None:
    """The board's boot firmware package (raspi-firmware, in non-free-firmware), in
    an apt tree of its own (the kernel's tree stays as the other boards use it),
    extracted once per version."""
    fw = b.board.get("bootloader", "firmware")
    package, component = str(fw["package"]), str(fw.get("component", "main"))
    apt = b.cache / "apt-arm64-firmware"
    env = {"FETCH_DEBS_COMPONENTS": component} if component != "main" else {}
    _run.run(["sh", str(FETCH_DEBS), str(apt), "-", package], env=env, timeout=1800)
    versions = dict(line.split()[:2] for line in (apt / "debs.list").read_text().splitlines())
    if package not in versions:
        raise CommandError(["fetch-debs"], 1, f"{package}: not resolved in {apt}")
    root = b.cache / "firmware" / f"{package}_{versions[package]}"
    b.firmware_root = root
    if (root / ".done").exists():
        return
    debs = [d for d in apt.glob(f"archives/{package}_*.deb")
            if deb_version(d) == versions[package]]  # fmt: skip
    if not debs:
        raise CommandError(["fetch-debs"], 1, f"{package} {versions[package]}: no .deb in {apt}")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    _run.run(["dpkg-deb", "-x", str(debs[0]), str(root)])
    (root / ".done").touch()


def deb_version(deb: Path) -> str:
    """The version in a .deb's file name (apt quotes the epoch's ':' as %3a)."""
    from urllib.parse import unquote

    return unquote(deb.name.split("_")[1])


def _merge_usr(root: Path) -> None:
    """Fold the packages' /lib, /bin, /sbin into /usr (merged-usr, as bookworm)."""
    for d in ("lib", "bin", "sbin"):
        if (root / d).is_dir() and not (root / d).is_symlink():
            shutil.copytree(root / d, root / "usr" / d, symlinks=True, dirs_exist_ok=True)
            shutil.rmtree(root / d)
            os.symlink(f"usr/{d}", root / d)
