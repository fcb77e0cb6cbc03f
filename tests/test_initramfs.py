"""The initramfs (pvpy/workstation/image/initramfs.py): packed small, trimmed but complete.

The quick test packs a small tree. The slow ones (marker ``qemu``: they fetch the
board's Debian arm64 packages, ~85 MB the first time, like tests/test_qemu.py)
stage the real qemu-arm64 tree and run its own arm64 python under qemu-user
(``qemu-aarch64-static -L TREE``): every module a device imports must import
from the trimmed stdlib, and the device's paths that load modules lazily (a
posted state verified by the API's child, the TLS certificate made, the CLI)
must run. Nothing of the host's python is on that interpreter's path.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pvpy.signing import SigningKey, sign_state
from pvpy.state import canonical
from pvpy.workstation.image import load_board
from pvpy.workstation.image.context import ImageBuild, default_cache
from pvpy.workstation.image.initramfs import DIST, PY, pack_initramfs, stage_initramfs
from pvpy.workstation.image.modules import load_order
from pvpy.workstation.image.packages import (
    ensure_debian_packages,
    extract_packages,
    fetch_packages,
)
from tests.conftest import minimal_state

qemu = pytest.mark.qemu

ZSTD_MAGIC = bytes.fromhex("28b52ffd")


def _unzstd(data: bytes) -> bytes:
    """The one zstd frame of ``data``, without the zero padding after it (zstd(1)
    stops at the first zero byte it does not know as a frame)."""
    for pad in range(4):
        frame = data[: len(data) - pad] if pad else data
        if pad and data[len(data) - pad :] != bytes(pad):
            break
        proc = subprocess.run(["zstd", "-d", "-c", "-q"], input=frame, capture_output=True)
        if proc.returncode == 0:
            return proc.stdout
    raise AssertionError("not one zstd frame followed by zero padding")


def test_packed_as_one_zstd_frame_padded_for_an_appended_cpio(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "init").write_text("#!/bin/sh\n")
    (tree / "usr" / "bin" / "tool").write_bytes(b"x" * 1001)
    out = tmp_path / "initrd"
    pack_initramfs(tree, out, level=3)
    data = out.read_bytes()
    # the kernel takes an uncompressed cpio after it only at a 4-byte boundary
    assert data[:4] == ZSTD_MAGIC and len(data) % 4 == 0
    cpio = _unzstd(data)
    listed = subprocess.run(["cpio", "-t", "--quiet"], input=cpio, capture_output=True,
                            check=True).stdout.decode().split()  # fmt: skip
    assert sorted(listed) == ["init", "usr", "usr/bin", "usr/bin/tool"]
    verbose = subprocess.run(["cpio", "-tv", "--quiet"], input=cpio, capture_output=True,
                             check=True).stdout.decode()  # fmt: skip
    assert all(" root " in line for line in verbose.splitlines()), verbose


# -- the real tree, run under qemu-user ---------------------------------------------------


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageBuild, Path]:
    ensure_debian_packages({"qemu-aarch64-static": "qemu-user-static", "zstd": "zstd"})
    work = tmp_path_factory.mktemp("initramfs")
    b = ImageBuild(board=load_board("qemu-arm64"), out=work, disk=work / "disk.img",
                   spec=Path("unused"), key=None, cache=default_cache(), work=work)  # fmt: skip
    fetch_packages(b)
    extract_packages(b)
    tree = work / "tree"
    stage_initramfs(b, tree)
    return b, tree


def in_tree(tree: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The tree's own python3.11 (arm64, under qemu-user), isolated (-I: no
    PYTHON* variables, no user site): its path is the tree's stdlib and dist-packages."""
    return subprocess.run(
        ["qemu-aarch64-static", "-L", str(tree), str(tree / "usr/bin/python3.11"), "-I", *args],
        capture_output=True, text=True, timeout=timeout, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip


IMPORT_ALL = """
import importlib, json, pkgutil, sys
import pvpy
failed = {}
names = [m.name for m in pkgutil.walk_packages(pvpy.__path__, "pvpy.")
         if not m.name.startswith("pvpy.workstation") and not m.name.endswith("__main__")]
for name in names:
    try:
        importlib.import_module(name)
    except Exception as e:
        failed[name] = f"{type(e).__name__}: {e}"
try:
    import smtplib  # nothing on a device sends mail: trimmed away
    trimmed = False
except ImportError:
    trimmed = True
print(json.dumps({"imported": len(names), "failed": failed, "trimmed": trimmed,
                  "path": sys.path}))
"""


@qemu
def test_every_device_module_imports_from_the_trimmed_tree(
    staged: tuple[ImageBuild, Path],
) -> None:
    _, tree = staged
    proc = in_tree(tree, "-c", IMPORT_ALL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["failed"] == {}
    assert result["imported"] > 50
    # the check is honest: only the tree is on the path, and the tree is trimmed
    assert result["trimmed"], "smtplib is in the initramfs: the stdlib was not trimmed"
    assert all(p.startswith(str(tree)) for p in result["path"]), result["path"]
    stdlib = tree / PY
    assert not list(stdlib.rglob("*.py")), "stdlib sources shipped beside their .pyc"
    assert (stdlib / "json" / "__init__.pyc").is_file()
    assert (tree / DIST / "pvpy" / "device" / "pid1" / "__init__.py").is_file()  # pvpy keeps them
    assert not (tree / DIST / "yaml").exists() and not (tree / DIST / "jsonschema/tests").exists()


@qemu
def test_lazy_device_paths_run_in_the_trimmed_tree(
    staged: tuple[ImageBuild, Path], tmp_path: Path, key: SigningKey, key_dir: Path
) -> None:
    """What imports modules only when it runs: the API's verifier child on a posted
    state (signature, schema), the device's TLS certificate, the CLI's device verbs."""
    _, tree = staged
    storage = tmp_path / "storage"
    (storage / "trust").mkdir(parents=True)
    (storage / "trust" / "00-pvpy.pub").write_bytes((key_dir / "pvpy.pub").read_bytes())
    state = canonical.encode(minimal_state(5))
    request: dict[str, Any] = {
        "op": "check", "storage": str(storage), "state": _b64(state),
        "signature": _b64(sign_state(state, [key])), "keys": None,
    }  # fmt: skip
    proc = subprocess.run(
        ["qemu-aarch64-static", "-L", str(tree), str(tree / "usr/bin/python3.11"), "-I",
         "-m", "pvpy.device.api._verify"],
        input=json.dumps(request), capture_output=True, text=True, timeout=600,
        env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    reply = json.loads(proc.stdout)
    assert reply.get("revision") == 5, reply
    # a bad signature: refused as a pvpy error (the schema and crypto code ran)
    request["signature"] = _b64(sign_state(canonical.encode(minimal_state(6)), [key]))
    proc = subprocess.run(
        ["qemu-aarch64-static", "-L", str(tree), str(tree / "usr/bin/python3.11"), "-I",
         "-m", "pvpy.device.api._verify"],
        input=json.dumps(request), capture_output=True, text=True, timeout=600,
        env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 0 and "error" in json.loads(proc.stdout), proc.stderr[-2000:]

    tls = in_tree(tree, "-c", "import sys; from pvpy.provision import make_api_tls; "
                  f"print(make_api_tls({str(storage)!r}))")  # fmt: skip
    assert tls.returncode == 0 and len(tls.stdout.strip()) == 64, tls.stderr[-2000:]
    cli = in_tree(tree, "-m", "pvpy", "device", "api", "--help")
    assert cli.returncode == 0 and "--storage" in cli.stdout, cli.stderr[-2000:]


@qemu
def test_only_the_boards_modules_ship(staged: tuple[ImageBuild, Path]) -> None:
    b, tree = staged
    moddir = tree / "usr/lib/modules" / b.kernel_version
    shipped = sorted(str(p.relative_to(moddir)) for p in moddir.rglob("*.ko"))
    wanted = load_order(b.kernel_root / "lib/modules" / b.kernel_version,
                        [str(m) for m in b.board.get("modules")])  # fmt: skip
    assert shipped == sorted(wanted)


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()
