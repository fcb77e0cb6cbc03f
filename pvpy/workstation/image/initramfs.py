"""The initramfs: python + pruned stdlib (.pyc) + pvpy + crun + busybox + modules, and its /init.

Staged from the extracted packages (``packages``), packed as an uncompressed
newc cpio and cached under the build cache: rebuilt only when the resolved
packages, the board file or pvpy's sources change (``_initramfs_key``). Its
``/init`` is a two-line Python script that runs ``pvpy.device.pid1`` in board
mode with the board's device file (``Board.device_config``).
"""

from __future__ import annotations

import compileall
import hashlib
import json
import os
import py_compile
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from pvpy import _run, paths
from pvpy.errors import CommandError
from pvpy.log import get_logger
from pvpy.workstation.image.board import PACKAGE
from pvpy.workstation.image.context import ImageBuild
from pvpy.workstation.image.modules import load_order

__all__ = ["build_initramfs", "stage_initramfs"]

log = get_logger("image")

# Bump when the staging below changes in a way the cache key does not see.
STAGE_VERSION = 1

MULTIARCH = "usr/lib/aarch64-linux-gnu"
PY = "usr/lib/python3.11"
DIST = "usr/lib/python3/dist-packages"
STDLIB_DROP = {
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
    "distutils", "venv", "sqlite3", "curses", "dbm", "unittest", "turtle.py", "pydoc.py",
    "doctest.py", "config-3.11-aarch64-linux-gnu", "EXTERNALLY-MANAGED", "__phello__",
    "antigravity.py", "this.py", "_pydecimal.py", "pdb.py", "lib-dynload",
}  # fmt: skip
DYNLOAD_DROP = re.compile(
    r"^(_test|xxlimited|_ctypes_test|_curses|readline|_dbm|nis|_sqlite3|audioop|_tkinter|"
    r"_xxsubinterpreters|_xxtestfuzz|_lsprof|_crypt)"
)
DIST_KEEP = {
    "cryptography", "_cffi_backend", "jsonschema", "attr", "attrs", "pyrsistent",
    "_pyrsistent_version.py", "pvectorc", "yaml", "_yaml", "structlog",
}  # fmt: skip
DIST_INFO_KEEP = {"jsonschema", "attrs", "cryptography", "pyrsistent", "pyyaml", "structlog"}
BUSYBOX_APPLETS = (
    "sh", "mount", "umount", "ls", "cat", "mkdir", "ip", "ps", "poweroff", "reboot", "sleep",
    "dmesg", "free", "df", "grep", "udhcpc", "ifconfig", "losetup",
)  # fmt: skip


def _initramfs_key(b: ImageBuild) -> str:
    h = hashlib.sha256(f"{STAGE_VERSION}\n".encode())
    h.update((b.apt / "debs.list").read_bytes())
    h.update((b.board.dir / "board.yaml").read_bytes())
    src = PACKAGE
    for path in sorted(src.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            h.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def build_initramfs(b: ImageBuild) -> None:
    """Stage the initramfs tree and pack it (newc cpio, uncompressed), cached."""
    cached = b.cache / "initramfs" / f"{b.board.name}-{_initramfs_key(b)}"
    b.initrd, b.kernel = cached / "initrd.cpio", cached / "Image"
    if b.initrd.exists() and b.kernel.exists():
        log.info("initramfs cached", path=str(cached))
        return
    tree = b.work / "initramfs"
    stage_initramfs(b, tree)
    cached.mkdir(parents=True, exist_ok=True)
    names = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    data = _run.run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=str(tree),
                    input="\n".join(names).encode() + b"\n").stdout  # fmt: skip
    (cached / "initrd.cpio.tmp").write_bytes(data)
    image = str(b.board.get("kernel", "image")).format(version=b.kernel_version)
    shutil.copyfile(b.kernel_root / image, cached / "Image")
    os.replace(cached / "initrd.cpio.tmp", b.initrd)
    shutil.rmtree(tree, ignore_errors=True)
    for old in (b.cache / "initramfs").iterdir():  # keep the cache from growing
        if old != cached and old.name.startswith(f"{b.board.name}-"):
            shutil.rmtree(old, ignore_errors=True)


def stage_initramfs(b: ImageBuild, out: Path) -> None:
    """The initramfs tree in ``out``: the root PID 1 starts in (its /init runs
    ``pvpy.device.pid1`` in board mode with the board's file)."""
    full = b.packages_root
    shutil.rmtree(out, ignore_errors=True)

    def copy(src: Path, rel: str) -> None:
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            os.symlink(os.readlink(src), dst)
        elif src.is_dir():
            shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)

    for d in ("usr/bin", "usr/sbin", "usr/lib", "dev", "proc", "sys", "run", "tmp", "etc/pvpy",
              "storage", "mnt", "root", "var/lock", "newroot"):  # fmt: skip
        (out / d).mkdir(parents=True, exist_ok=True)
    for d in ("bin", "sbin", "lib"):
        os.symlink(f"usr/{d}", out / d)
    (out / "tmp").chmod(0o1777)

    # Python: the interpreter and the stdlib minus what a device never imports.
    copy(full / "usr/bin/python3.11", "usr/bin/python3.11")
    os.symlink("python3.11", out / "usr/bin/python3")
    for entry in (full / PY).iterdir():
        if entry.name not in STDLIB_DROP:
            copy(entry, f"{PY}/{entry.name}")
    for so in (full / PY / "lib-dynload").iterdir():
        if not DYNLOAD_DROP.match(so.name):
            copy(so, f"{PY}/lib-dynload/{so.name}")
    for entry in (full / DIST).iterdir():
        stem = entry.name.split(".")[0] if entry.suffix == ".so" else entry.name
        if stem in DIST_KEEP or entry.name in DIST_KEEP:
            copy(entry, f"{DIST}/{entry.name}")
    for entry in (full / DIST).glob("*-info"):  # importlib.metadata asks for versions
        if entry.name.split("-")[0].lower() in DIST_INFO_KEEP:
            copy(entry, f"{DIST}/{entry.name}")
    shutil.copytree(PACKAGE, out / DIST / "pvpy",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip

    # crun, busybox (the applets pvpy and the board need: mount -o loop, ip, udhcpc).
    copy(full / "usr/bin/crun", "usr/bin/crun")
    copy(full / "usr/bin/busybox", "usr/bin/busybox")
    for applet in BUSYBOX_APPLETS:
        os.symlink("busybox", out / "usr/bin" / applet)
    copy(full / MULTIARCH / "ld-linux-aarch64.so.1", f"{MULTIARCH}/ld-linux-aarch64.so.1")
    os.symlink("aarch64-linux-gnu/ld-linux-aarch64.so.1", out / "usr/lib/ld-linux-aarch64.so.1")
    _library_closure(full, out, copy)
    # Debian's cryptography 38 loads OpenSSL 3's legacy provider: without it every
    # call fails with "InternalError: Unknown OpenSSL error".
    copy(full / MULTIARCH / "ossl-modules/legacy.so", f"{MULTIARCH}/ossl-modules/legacy.so")

    # Kernel modules in load order (no depmod, no kmod: see .modules).
    moddir = b.kernel_root / "lib/modules" / b.kernel_version
    order = load_order(moddir, [str(m) for m in b.board.get("modules")])
    target = f"usr/lib/modules/{b.kernel_version}"
    for rel in order:
        copy(moddir / rel, f"{target}/{rel}")
    (out / target / paths.MODULES_LOAD_LIST).write_text("\n".join(order) + "\n")

    (out / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (out / "etc/group").write_text("root:x:0:\n")
    board_file = paths.BOARD_FILE.lstrip("/")
    (out / board_file).write_text(json.dumps(b.board.device_config(), indent=1) + "\n")
    extra = [str(a) for a in b.board.doc.get("init_args", [])]
    args = ["--board", paths.BOARD_FILE, *extra]
    (out / "init").write_text(
        "#!/usr/bin/python3.11\n"
        '"""PID 1 of the initramfs (written by pvpy image build): pvpy init, board mode."""\n'
        "from pvpy.device.pid1 import main\n\n"
        f"main({args!r})\n"
    )
    (out / "init").chmod(0o755)
    _precompile(out)


def _library_closure(full: Path, out: Path, copy: Callable[[Path, str], None]) -> None:
    """Add every shared library the staged ELF files need (DT_NEEDED), transitively."""

    def is_elf(path: Path) -> bool:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"

    seen: set[str] = set()
    todo = [p for p in out.rglob("*") if p.is_file() and not p.is_symlink() and is_elf(p)]
    while todo:
        text = _run.run(["readelf", "-d", str(todo.pop())]).stdout.decode()
        for name in re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", text):
            if name in seen or name == "ld-linux-aarch64.so.1":
                continue
            seen.add(name)
            src = full / MULTIARCH / name
            if not (src.exists() or src.is_symlink()):
                raise CommandError(["readelf"], 1, f"library {name} is in no fetched package")
            copy(src, f"{MULTIARCH}/{name}")
            real = src.resolve()
            if real != src:
                copy(real, f"{MULTIARCH}/{real.name}")
            todo.append(out / MULTIARCH / real.name)


def _precompile(out: Path) -> None:
    """.pyc with unchecked hashes: no source stat at import (boot time under TCG).

    The host's python must be 3.11 like the image's (same bytecode magic for
    every 3.11.x); otherwise the image boots from source, slower.
    """
    if sys.version_info[:2] != (3, 11):
        log.warning("host python is not 3.11: initramfs without .pyc (slower boot)")
        return
    for tree in (out / PY, out / DIST):
        compileall.compile_dir(
            str(tree), quiet=2, workers=0, stripdir=str(out), prependdir="/",
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )  # fmt: skip
