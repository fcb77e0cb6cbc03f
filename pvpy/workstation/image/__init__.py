"""``pvpy image build``: a bootable disk image for a board (workstation side).

The pipeline (``build``), one step each, in order::

    ensure_host_tools    Debian host packages the build needs (apt-get when missing)
    fetch_packages       the board's arm64 packages, cached (rootfs/fetch-debs)
    extract_packages     dpkg-deb -x into the cache (once per resolved package set)
    build_initramfs      python + pruned stdlib (.pyc) + pvpy + crun + busybox + modules
    build_revision       the spec + bsp (kernel, initrd, cmdline) -> a signed revision
    provision_storage    pvpy's own provisioning (verifies it) + boot.scr + API token
    build_disk           GPT: storage (mkfs.ext4 -d, no mount), pvmarker; placed with dd
    build_env_flash      U-Boot's env flash: its defaults + the board's bootcmd

Raspberry Pi boards (``bootloader.type: rpi-tryboot``: boards/rpi4, boards/rpi5)
run ``RPI_STEPS`` instead: the same packages, initramfs, revision and storage,
plus ``fetch_firmware`` (raspi-firmware, from non-free-firmware) and
``find_dtb`` (the device tree, a BSP object of the revision), and
``build_rpi_disk``: MBR with the tryboot config partition, boot A and B, the
storage (see the "Raspberry Pi" section below).

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

import compileall
import hashlib
import json
import os
import py_compile
import re
import shutil
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvpy import _run, paths, rpiboot
from pvpy.errors import CommandError, ManifestError, UsageError
from pvpy.log import get_logger

log = get_logger("image")

PACKAGE = Path(__file__).resolve().parents[2]  # pvpy/, copied into the initramfs
REPO = PACKAGE.parent
BOARDS = REPO / "boards"
FETCH_DEBS = REPO / "rootfs" / "fetch-debs"
DEFAULT_SPEC = REPO / "examples" / "demo" / "spec.yaml"
IMAGE_MANIFEST = "image.json"
BOARD_FILE_IN_IMAGE = "etc/pvpy/board.json"
# Bump when the staging below changes in a way the cache key does not see.
STAGE_VERSION = 1

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

MULTIARCH = "usr/lib/aarch64-linux-gnu"
PY = "usr/lib/python3.11"
DIST = "usr/lib/python3/dist-packages"
# The kernel's install-time dependencies (and python3's own wrappers): fetched
# because apt resolves them, never extracted.
NOT_EXTRACTED = re.compile(
    r"^(initramfs-tools.*|udev|klibc-utils|libklibc|kmod|adduser|debconf|dpkg|coreutils|tar|"
    r"passwd|libpam.*|libsemanage.*|libaudit.*|logsave|linux-base|cpio|python3|python3-minimal|"
    r"libpython3-stdlib|readline-common|media-types|python3\.11)$"
)
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
_SIZE = re.compile(r"^(\d+)([KMG]?)$")


# -- the board -----------------------------------------------------------------------------


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
        """What PID 1 reads in board mode (pvpy.device.board.BoardConfig)."""
        config = {
            "name": self.name,
            "storage": self.doc.get("storage", "PARTLABEL=storage"),
            "modules_on_demand": list(self.doc.get("modules_on_demand", [])),
            "network": dict(self.doc.get("network") or {}),
        }
        if is_rpi(self):  # what PID 1 needs for tryboot and to write a try partition
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
        known = sorted(p.name for p in BOARDS.iterdir()) if BOARDS.is_dir() else []
        raise UsageError(f"no board {name!r} ({e.strerror}); boards: {known}") from e
    except yaml.YAMLError as e:
        raise ManifestError(f"{path / 'board.yaml'}: invalid YAML: {e}") from e
    if not isinstance(doc, dict) or doc.get("name") != path.name:
        raise ManifestError(f"{path / 'board.yaml'}: a mapping with name: {path.name}")
    return Board(name=path.name, dir=path, doc=doc)


def _size(text: str | int) -> int:
    match = _SIZE.match(str(text).strip())
    if not match:
        raise ManifestError(f"not a size: {text!r} (use e.g. 512M)")
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)]


# -- host side ---------------------------------------------------------------------------


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


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pvpy"


# -- the pipeline ---------------------------------------------------------------------------


@dataclass
class ImageBuild:
    board: Board
    out: Path
    disk: Path
    spec: Path
    key: Path | None
    cache: Path
    work: Path
    timings: dict[str, float] = field(default_factory=dict)
    kernel_package: str = ""
    kernel_version: str = ""
    packages_root: Path = Path()
    kernel_root: Path = Path()
    initrd: Path = Path()
    kernel: Path = Path()
    revision: int = 0
    revision_dir: Path = Path()
    storage: Path = Path()
    trust: Path = Path()
    dtb: Path | None = None  # the board's device tree, from the kernel package (rpi)
    firmware_root: Path = Path()  # the extracted boot firmware package (rpi)

    @property
    def apt(self) -> Path:
        return self.cache / "apt-arm64"


def ensure_host_tools(b: ImageBuild) -> None:
    if is_rpi(b.board):  # build_update runs this step for every board
        ensure_rpi_host_tools(b)
        return
    ensure_debian_packages(HOST_TOOLS, {str(b.board.u_boot): b.board.get("bootloader", "package")})


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
        deb = next((d for d in debs if _deb_version(d) == version), debs[-1] if debs else None)
        if deb is None:
            raise CommandError(["fetch-debs"], 1, f"{name} {version}: no .deb in {b.apt}")
        target = b.kernel_root if name == b.kernel_package else b.packages_root
        _run.run(["dpkg-deb", "-x", str(deb), str(target)])
    _merge_usr(b.packages_root)
    (root / ".done").touch()


def _deb_version(deb: Path) -> str:
    from urllib.parse import unquote

    return unquote(deb.name.split("_")[1])


def _merge_usr(root: Path) -> None:
    """Fold the packages' /lib, /bin, /sbin into /usr (merged-usr, as bookworm)."""
    for d in ("lib", "bin", "sbin"):
        if (root / d).is_dir() and not (root / d).is_symlink():
            shutil.copytree(root / d, root / "usr" / d, symlinks=True, dirs_exist_ok=True)
            shutil.rmtree(root / d)
            os.symlink(f"usr/{d}", root / d)


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

    # Kernel modules in load order (pvpy.device.board.modules: no depmod, no kmod).
    from pvpy.device.board.modules import LOAD_LIST, load_order

    moddir = b.kernel_root / "lib/modules" / b.kernel_version
    order = load_order(moddir, [str(m) for m in b.board.get("modules")])
    for rel in order:
        copy(moddir / rel, f"usr/lib/modules/{b.kernel_version}/{rel}")
    (out / f"usr/lib/modules/{b.kernel_version}" / LOAD_LIST).write_text("\n".join(order) + "\n")

    (out / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (out / "etc/group").write_text("root:x:0:\n")
    (out / BOARD_FILE_IN_IMAGE).write_text(json.dumps(b.board.device_config(), indent=1) + "\n")
    extra = [str(a) for a in b.board.doc.get("init_args", [])]
    args = ["--board", f"/{BOARD_FILE_IN_IMAGE}", *extra]
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


def _absolute_sources(doc: dict[str, Any], spec_dir: Path) -> None:
    """Make the spec's sources absolute, so the spec can be rewritten elsewhere."""

    def fix(value: Any) -> Any:
        if isinstance(value, str):
            return str(spec_dir / value)
        if isinstance(value, dict):
            return {k: str(spec_dir / v) if k in ("dir", "tar", "oci", "file", "squashfs")
                    and isinstance(v, str) else v for k, v in value.items()}  # fmt: skip
        return value

    bsp = doc.get("bsp")
    if isinstance(bsp, dict):
        for key in ("kernel", "initrd", "dtb", "modules", "firmware"):
            if key in bsp:
                bsp[key] = fix(bsp[key])
    for container in (doc.get("containers") or {}).values():
        if isinstance(container, dict) and "rootfs" in container:
            container["rootfs"] = fix(container["rootfs"])


def _arm64_busybox_trees(b: ImageBuild, doc: dict[str, Any], work: Path) -> None:
    """Busybox trees (rootfs/busybox-tree) built on the host carry the host's busybox:
    copy each one and put the board's busybox in its place. Other rootfs are left as
    they are (they must be built for the board already)."""
    busybox = b.packages_root / "usr/bin/busybox"
    for name, container in (doc.get("containers") or {}).items():
        rootfs = container.get("rootfs") if isinstance(container, dict) else None
        source = rootfs.get("dir") if isinstance(rootfs, dict) else rootfs
        if not isinstance(source, str) or not (Path(source) / "bin/busybox").is_file():
            continue
        tree = work / "rootfs" / name
        shutil.rmtree(tree, ignore_errors=True)
        shutil.copytree(source, tree, symlinks=True)
        shutil.copy2(busybox, tree / "bin/busybox")
        if isinstance(rootfs, dict):
            container["rootfs"] = {**rootfs, "dir": str(tree)}
        else:
            container["rootfs"] = str(tree)
        log.info("rootfs: arm64 busybox", container=name)


def build_board_revision(
    b: ImageBuild, spec: Path, out: Path, bsp_from: Path | None = None,
    revision: int | None = None,
) -> Path:  # fmt: skip
    """``spec`` built for the board into ``out`` and signed with ``b.key``.

    The board's BSP is added: its kernel, the initramfs and the kernel command
    line (the board's, then the spec's). With ``bsp_from`` (a revision dir, e.g.
    the factory ``b.revision_dir``) the BSP is taken from that revision instead,
    object for object: a later revision built so differs from it only in what
    the spec changes (an app-only update), whatever happened to the initramfs
    cache since. Busybox trees get the board's busybox. Used for the factory
    revision and for updates to an image. Raises PvpyError subclasses.
    """
    import tempfile

    import yaml

    from pvpy.signing import load_signing_key, sign_state
    from pvpy.state import canonical
    from pvpy.store import SIGNATURE_FILE, STATE_FILE, write_atomic
    from pvpy.workstation.spec import build, load_spec

    if b.key is None:
        raise UsageError("no signing key for the revision (--key)")
    key = load_signing_key(b.key)  # before the work: a wrong key path fails at once
    doc = load_spec(spec)
    _absolute_sources(doc, spec.resolve().parent)
    bsp = dict(doc.get("bsp") or {})
    if bsp_from is not None:
        base = canonical.decode((bsp_from / STATE_FILE).read_bytes())["bsp"]
        for part in ("kernel", "initrd", "dtb"):
            if isinstance(base.get(part), dict):
                bsp[part] = str(bsp_from / "objects" / base[part]["sha256"])
        bsp["cmdline"] = base.get("cmdline", "")
    else:
        board_cmdline = str(b.board.doc.get("cmdline") or "")
        cmdline = " ".join(filter(None, [board_cmdline, bsp.get("cmdline")]))
        bsp.update(kernel=str(b.kernel), initrd=str(b.initrd), cmdline=cmdline)
        if b.dtb is not None:  # a signed BSP object too: an update can change it
            bsp["dtb"] = str(b.dtb)
    doc["bsp"] = bsp
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        _arm64_busybox_trees(b, doc, Path(tmp))
        board_spec = Path(tmp) / "spec.yaml"
        board_spec.write_text(yaml.safe_dump(doc, sort_keys=False))
        shutil.rmtree(out, ignore_errors=True)
        build(board_spec, out, revision)
    data = (out / STATE_FILE).read_bytes()
    write_atomic(out / SIGNATURE_FILE, sign_state(data, [key]))
    return out


def build_update(
    image: Path, spec: Path, out: Path, key: Path | None = None, cache: Path | None = None,
    revision: int | None = None,
) -> Path:  # fmt: skip
    """A signed update for an image of ``build_image``: ``spec`` built for its board
    into ``out`` with the image's factory BSP (the same kernel and initramfs
    objects and command line: a spec that changes only apps makes an app-only
    update), signed with ``key`` (default: the image's ``keys/``, made by an
    image build without ``--key``; an image built with one needs it). The board's
    packages come from the cache (fetched when missing). Returns ``out``.
    Raises PvpyError subclasses.
    """
    image_dir = Path(image) if Path(image).is_dir() else Path(image).parent
    try:
        manifest = json.loads((image_dir / IMAGE_MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{image_dir}: not an image of `pvpy image build` ({e})") from e
    board = load_board(str(manifest.get("board_dir") or manifest["board"]))
    b = ImageBuild(board=board, out=image_dir, disk=image_dir / str(manifest["disk"]),
                   spec=Path(spec), key=Path(key) if key else image_dir / "keys",
                   cache=Path(cache or default_cache()), work=image_dir / ".work")  # fmt: skip
    for step in (ensure_host_tools, fetch_packages, extract_packages):
        step(b)
    return build_board_revision(b, b.spec, Path(out), bsp_from=image_dir / "revision",
                                revision=revision)  # fmt: skip


def build_revision(b: ImageBuild) -> None:
    """The spec with the board's BSP added, built and signed (the factory revision)."""
    from cryptography.hazmat.primitives import serialization

    from pvpy.signing import load_signing_key
    from pvpy.state import canonical

    if b.key is None:
        from pvpy.signing import generate_key

        keys = b.out / "keys"
        if not (keys / "pvpy.key").exists():
            generate_key(keys)
            log.warning("no --key: signed with a new development key", keys=str(keys))
        b.key = keys
    b.revision_dir = build_board_revision(b, b.spec, b.out / "revision")
    b.revision = int(canonical.decode((b.revision_dir / "state.json").read_bytes())["revision"])
    key = load_signing_key(b.key)
    b.trust = b.out / "trust.pub"
    b.trust.write_bytes(key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip


def provision_storage(b: ImageBuild) -> None:
    """pvpy's provisioning (verifies the revision, installs it with its boot.env),
    then what the board adds: the boot script, and a copy of the API token beside the image."""
    from pvpy.provision import provision

    b.storage = b.work / "storage"
    shutil.rmtree(b.storage, ignore_errors=True)
    provision(b.storage, b.revision_dir, [b.trust])
    if b.board.doc.get("bootloader", {}).get("script"):  # U-Boot boards; the Pi has none
        script = b.board.dir / b.board.get("bootloader", "script")
        _run.run(["mkimage", "-A", "arm64", "-T", "script", "-C", "none", "-n", "pvpy boot",
                  "-d", str(script), str(b.storage / "boot.scr")])  # fmt: skip
    # The token provisioning made, beside the image for `pvpy device push --token-file`.
    token = (b.storage / paths.API_TOKEN).read_bytes()
    fd = os.open(b.out / "api-token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(token)


def build_disk(b: ImageBuild) -> None:
    """GPT with the board's partitions; ext4 filled from a directory (mkfs.ext4 -d)."""
    parts = b.board.get("partitions")
    table = ["label: gpt"]
    images: list[tuple[int, Path]] = []
    start = 1 << 20
    for part in parts:
        size = _size(part["size"])
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


def build_env_flash(b: ImageBuild) -> None:
    """U-Boot's env flash for qemu_arm64: crc32 (LE) + ``name=value\\0``... + ``\\0``.

    A valid env *replaces* U-Boot's built-in one, so start from the defaults,
    taken out of u-boot.bin (the NUL-separated block from ``bootcmd=run
    distro_bootcmd`` to ``\\0\\0``), and apply the board's overrides.
    """
    blob = b.board.u_boot.read_bytes()
    try:
        start = blob.index(b"bootcmd=run distro_bootcmd\0")
    except ValueError as e:
        raise ManifestError(f"{b.board.u_boot}: no default environment found") from e
    env: dict[str, str] = {}
    for entry in blob[start : blob.index(b"\0\0", start)].split(b"\0"):
        name, _, value = entry.decode().partition("=")
        env[name] = value
    env.update({str(k): str(v) for k, v in b.board.get("bootloader", "env").items()})
    size = int(b.board.get("bootloader", "env_size"))
    data = b"".join(f"{k}={v}".encode() + b"\0" for k, v in sorted(env.items())) + b"\0"
    if len(data) > size - 4:
        raise ManifestError(f"board {b.board.name}: the U-Boot env exceeds {size} bytes")
    data = data.ljust(size - 4, b"\0")
    flash = zlib.crc32(data).to_bytes(4, "little") + data
    flash = flash.ljust(int(b.board.get("bootloader", "env_flash_size")), b"\xff")  # erased
    (b.out / "uboot-env.img").write_bytes(flash)


def _write_image_manifest(b: ImageBuild, **board_specific: Any) -> None:
    """``image.json``: what every image has, plus what its kind of boot needs."""
    manifest = {
        "board": b.board.name,
        "board_dir": str(b.board.dir),
        "disk": b.disk.name,
        **board_specific,
        "kernel_package": b.kernel_package,
        "revision": b.revision,
        "api_token": "api-token",
        "qemu": b.board.doc.get("qemu", {}),
    }
    (b.out / IMAGE_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def write_manifest(b: ImageBuild) -> None:
    _write_image_manifest(b, env_flash="uboot-env.img", u_boot=str(b.board.u_boot))


STEPS: list[Callable[[ImageBuild], None]] = [
    ensure_host_tools, fetch_packages, extract_packages, build_initramfs, build_revision,
    provision_storage, build_disk, build_env_flash, write_manifest,
]  # fmt: skip


# -- Raspberry Pi (boards/rpi4, boards/rpi5) --------------------------------------------------
#
# The Pi's firmware boots from MBR + FAT and reads no boot script: its A/B is
# tryboot (pvpy/bootenv/rpi.py). The disk, in the order of the board's partitions:
# "config" (FAT16, first: the bootloader reads autoboot.txt only there) with
# autoboot.txt and pvpy.env, written by the RpiTryboot backend itself, so the
# device starts from exactly what the backend writes; boot A and B (FAT32) with
# the firmware files, config.txt, cmdline.txt and the factory revision's BSP
# objects under fixed names (both: a stray tryboot lands on a bootable
# partition); the ext4 storage. FAT is filled with mtools, ext4 with
# ``mkfs.ext4 -d``: still no loop device and no mount.

RPI_BOOTLOADER = "rpi-tryboot"
RPI_HOST_TOOLS = {"mkfs.vfat": "dosfstools", "mcopy": "mtools", "mdir": "mtools"}
RPI_KERNEL = rpiboot.KERNEL  # names in a boot partition (config.txt points at them)
RPI_INITRD = rpiboot.INITRD
RPI_CONFIG = rpiboot.CONFIG
RPI_CMDLINE = rpiboot.CMDLINE
MBR_START = 1 << 20  # first partition at 1 MiB (SD erase-block alignment)


def is_rpi(board: Board) -> bool:
    return (board.doc.get("bootloader") or {}).get("type") == RPI_BOOTLOADER


@dataclass(frozen=True)
class RpiLayout:
    """Which MBR partition (1-4) is which, from the order of the board's partitions."""

    config: int
    boot: tuple[int, int]  # A, B: autoboot.txt's boot_partition values
    storage: int


def rpi_layout(board: Board) -> RpiLayout:
    """Raises ManifestError unless the board lists config, two boot and one ext4 partition."""
    parts = board.get("partitions")
    content = [str(p.get("content", "")) for p in parts]
    boots = [i + 1 for i, c in enumerate(content) if c == "boot"]
    storage = [i + 1 for i, p in enumerate(parts) if p.get("fs") == "ext4"]
    if len(parts) > 4 or content[:1] != ["config"] or len(boots) != 2 or len(storage) != 1:
        raise ManifestError(
            f"board {board.name}: MBR partitions must be a first 'content: config' one, two "
            "'content: boot' ones and one ext4 (at most 4)"
        )
    return RpiLayout(config=1, boot=(boots[0], boots[1]), storage=storage[0])


def rpi_config_txt(board: Board, revision: int, dtb_name: str | None) -> str:
    """config.txt of a boot partition: the board's settings, then our file names."""
    return rpiboot.config_txt(board.get("bootloader", "config"), revision, dtb_name)


def rpi_cmdline_txt(board: Board, cmdline: str, revision: int) -> str:
    """cmdline.txt (one line): the console, the revision's command line, ``pv_rev``
    (the revision whose files the partition holds; PID 1 checks it)."""
    return rpiboot.cmdline_txt(str(board.get("console")), cmdline, revision)


def rpi_boot_files(board: Board, revision_dir: Path, firmware: Path) -> dict[str, Path | bytes]:
    """What a boot partition holds for the revision in ``revision_dir`` (its
    state.json and objects/): the board's firmware files, then what
    ``pvpy.rpiboot.boot_files`` lays out (the device writes the same for an update).
    Raises ManifestError when the board's firmware or the revision's BSP lacks a file.
    """
    from pvpy.errors import DeviceError
    from pvpy.state import canonical
    from pvpy.store import STATE_FILE

    state = canonical.decode((revision_dir / STATE_FILE).read_bytes())
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


def rpi_dtb_name(board: Board) -> str | None:
    """The device tree's name in a boot partition (the firmware knows it by name)."""
    dtb = board.doc.get("dtb")
    return Path(str(dtb)).name if dtb else None


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


def ensure_rpi_host_tools(b: ImageBuild) -> None:
    tools = {cmd: pkg for cmd, pkg in HOST_TOOLS.items() if cmd != "mkimage"}  # no U-Boot
    ensure_debian_packages({**tools, **RPI_HOST_TOOLS})


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
            if _deb_version(d) == versions[package]]  # fmt: skip
    if not debs:
        raise CommandError(["fetch-debs"], 1, f"{package} {versions[package]}: no .deb in {apt}")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    _run.run(["dpkg-deb", "-x", str(debs[0]), str(root)])
    (root / ".done").touch()


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
        size, image = _size(part["size"]), b.work / f"part{number}.img"
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
    layout = rpi_layout(b.board)
    _write_image_manifest(
        b,
        boot=RPI_BOOTLOADER,
        partitions={"config": layout.config, "boot": list(layout.boot),
                    "storage": layout.storage},
        boot_files={"kernel": RPI_KERNEL, "initrd": RPI_INITRD, "cmdline": RPI_CMDLINE,
                    "config": RPI_CONFIG},
        dtb=b.dtb.name if b.dtb else None,
    )  # fmt: skip


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
