"""The initramfs: python + trimmed stdlib (.pyc) + pvpy + crun + busybox + modules, and its /init.

Staged from the extracted packages (``packages``), packed as a newc cpio
compressed with zstd (Debian's arm64 kernel has ``CONFIG_RD_ZSTD=y``) and cached
under the build cache: rebuilt only when the resolved packages, the board file
or pvpy's sources change (``_initramfs_key``). Its ``/init`` is a two-line
Python script that runs ``pvpy.device.pid1`` in board mode with the board's
device file (``Board.device_config``).

Small, because the kernel unpacks every byte before PID 1 starts (under QEMU's
emulation ~50 MiB cost seconds; see bench/findings.md, #18 part 2):

- the standard library is cut to what the device's code can import: a
  ``ModuleFinder`` walk from every pvpy module a device runs (all but
  ``pvpy.workstation``), following imports inside functions too, plus
  ``STDLIB_KEEP`` for what is imported by name (codecs, site's own);
- the stdlib and the third-party packages ship as sourceless ``.pyc`` (compiled
  next to where the ``.py`` was, which is where a sourceless import looks);
  pvpy keeps its sources (tracebacks on a board show its lines) with unchecked
  ``__pycache__`` .pyc;
- kernel modules are only the board's list and their dependencies (``modules``).

``tests/test_initramfs.py`` imports every device module inside the staged tree
with the tree's own arm64 python (qemu-user), so a module trimmed away that the
device needs fails a test, not a boot.
"""

from __future__ import annotations

import compileall
import hashlib
import json
import modulefinder
import os
import py_compile
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from pvpy import _run, paths
from pvpy.errors import CommandError
from pvpy.log import get_logger
from pvpy.workstation.image.board import PACKAGE
from pvpy.workstation.image.context import ImageBuild
from pvpy.workstation.image.modules import load_order
from pvpy.workstation.image.packages import ensure_debian_packages

__all__ = ["ZSTD_LEVEL", "build_initramfs", "device_modules", "pack_initramfs", "stage_initramfs"]

log = get_logger("image")

# Bump when the staging below changes in a way the cache key does not see.
STAGE_VERSION = 2

# zstd level of the packed initramfs. Decompression runs at about the same speed
# whatever the level; a higher one makes a smaller file (less for the bootloader
# to read) but costs build time. Measured in bench/findings.md (#18 part 2).
ZSTD_LEVEL = 6  # 13.8 MB in ~11 s; 19: 11.6 MB in ~150 s, paid at every pvpy change

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
# Third-party packages a device imports (yaml is not one: specs are read on the workstation).
DIST_KEEP = {
    "cryptography", "_cffi_backend", "jsonschema", "attr", "attrs", "pyrsistent",
    "_pyrsistent_version.py", "pvectorc", "structlog",
}  # fmt: skip
DIST_INFO_KEEP = {"jsonschema", "attrs", "cryptography", "pyrsistent", "structlog"}
DIST_DROP = {"tests", "benchmarks"}  # jsonschema ships its test suite
# Stdlib modules kept whatever ModuleFinder says: imported by name, not by an import
# statement (codecs by their encoding's name, site's hooks, ``-m``'s runner), or
# needed to print a traceback. A package here is kept whole.
STDLIB_KEEP = {
    "encodings", "site", "sitecustomize", "_sitebuiltins", "sysconfig", "runpy", "pkgutil",
    "traceback", "linecache", "tokenize", "token", "warnings", "codecs", "io", "abc", "os",
    "stat", "posixpath", "genericpath", "_collections_abc", "importlib", "zipimport",
}  # fmt: skip
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
    """Stage the initramfs tree and pack it (newc cpio, zstd), cached."""
    cached = b.cache / "initramfs" / f"{b.board.name}-{_initramfs_key(b)}"
    b.initrd, b.kernel = cached / "initrd.cpio.zst", cached / "Image"
    if b.initrd.exists() and b.kernel.exists():
        log.info("initramfs cached", path=str(cached))
        return
    tree = b.work / "initramfs"
    stage_initramfs(b, tree)
    cached.mkdir(parents=True, exist_ok=True)
    pack_initramfs(tree, cached / "initrd.cpio.tmp")
    image = str(b.board.get("kernel", "image")).format(version=b.kernel_version)
    shutil.copyfile(b.kernel_root / image, cached / "Image")
    os.replace(cached / "initrd.cpio.tmp", b.initrd)
    shutil.rmtree(tree, ignore_errors=True)
    for old in (b.cache / "initramfs").iterdir():  # keep the cache from growing
        if old != cached and old.name.startswith(f"{b.board.name}-"):
            shutil.rmtree(old, ignore_errors=True)


def pack_initramfs(tree: Path, out: Path, level: int = ZSTD_LEVEL) -> None:
    """``tree`` as a newc cpio (owned by root), zstd-compressed into ``out``.

    Padded with zeros to a multiple of 4 bytes: the kernel skips zeros between
    archives and takes a following uncompressed cpio only at a 4-byte boundary,
    so a cpio appended to this file (an update adding a file) still unpacks.
    Raises CommandError.
    """
    ensure_debian_packages({"zstd": "zstd"})
    names = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    data = _run.run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=str(tree),
                    input="\n".join(names).encode() + b"\n").stdout  # fmt: skip
    # one frame (-T0 splits the work, not the frame); no --long: the kernel's
    # decompressor allocates the frame's window, keep it at the level's default
    packed = _run.run(["zstd", "-q", f"-{level}", "-T0", "-c"], input=data, timeout=1800).stdout
    out.write_bytes(packed + bytes(-len(packed) % 4))


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
    for entry in list((out / DIST).glob("*/*")):
        if entry.is_dir() and entry.name in DIST_DROP:
            shutil.rmtree(entry)
    shutil.copytree(PACKAGE, out / DIST / "pvpy",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
    _trim_stdlib(out, device_modules(out))

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


def device_modules(out: Path) -> set[str]:
    """Names of the modules the device's code can import, found in the staged tree
    ``out``: every pvpy module but ``pvpy.workstation`` and what they import,
    transitively, including imports inside functions (ModuleFinder reads the
    bytecode). Modules it could not find (C extensions of this arm64 tree, the
    host's builtins) are included by name."""
    finder = modulefinder.ModuleFinder(path=[str(out / PY), str(out / DIST)],
                                       excludes=["pvpy.workstation"])  # fmt: skip
    for name in ["site", *_pvpy_modules(out / DIST)]:
        finder.import_hook(name)
    return set(finder.modules) | set(finder.badmodules)


def _pvpy_modules(dist: Path) -> Iterable[str]:
    for path in sorted((dist / "pvpy").rglob("*.py")):
        parts = path.relative_to(dist).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not name.startswith("pvpy.workstation"):
            yield name


def _trim_stdlib(out: Path, needed: set[str]) -> None:
    """Remove the stdlib modules (.py and lib-dynload extensions) that are neither
    in ``needed`` nor under ``STDLIB_KEEP``, then the directories left empty."""
    stdlib = out / PY
    keep = needed | STDLIB_KEEP
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name.startswith("_sysconfigdata"):  # sysconfig imports it by a computed name
            continue
        if name not in keep and not any(name.startswith(f"{k}.") for k in STDLIB_KEEP):
            path.unlink()
    for so in (stdlib / "lib-dynload").glob("*.so"):
        if so.name.split(".")[0] not in keep:
            so.unlink()
    for directory in sorted((p for p in stdlib.rglob("*") if p.is_dir()), reverse=True):
        if not any(directory.iterdir()):
            directory.rmdir()


def _precompile(out: Path) -> None:
    """The stdlib and third-party packages as sourceless .pyc (the .py removed), pvpy
    with unchecked-hash .pyc beside its sources: no source stat at import (boot time
    under TCG).

    The host's python must be 3.11 like the image's (same bytecode magic for
    every 3.11.x); otherwise the image keeps its sources and boots from them, slower.
    """
    if sys.version_info[:2] != (3, 11):
        log.warning("host python is not 3.11: initramfs without .pyc (slower boot)")
        return
    pvpy_dir = out / DIST / "pvpy"
    for tree, legacy in ((out / PY, True), (out / DIST, True), (pvpy_dir, False)):
        compileall.compile_dir(
            str(tree), quiet=2, workers=0, stripdir=str(out), prependdir="/", legacy=legacy,
            rx=re.compile(re.escape(f"{pvpy_dir}/")) if legacy else None,  # pvpy: below
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )  # fmt: skip
    for tree in (out / PY, out / DIST):
        for source in tree.rglob("*.py"):
            if pvpy_dir not in source.parents and source.with_suffix(".pyc").exists():
                source.unlink()  # its .pyc is beside it
