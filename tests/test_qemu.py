"""Boot a real qemu-arm64 image: U-Boot -> kernel -> ``pvpy init`` as PID 1 -> containers.

Slow (marker ``qemu``): the first run downloads ~85 MB of Debian arm64 packages
into ~/.cache/pvpy; later runs reuse them (image build ~15 s, boot to all
goals met ~20 s under TCG). Skipped only when qemu-system-aarch64 cannot be
installed. QEMU is always stopped (context manager), also when a check fails.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pvpy.board import boot_choice
from pvpy.errors import DeviceError, PvpyError
from pvpy.image import DEFAULT_SPEC, ImageBuild, build_image
from pvpy.modules import load_order
from pvpy.qemu import Machine, ensure_qemu
from pvpy.store import boot_env

qemu = pytest.mark.qemu

BOOT_TIMEOUT = 180.0  # TCG on a busy 2-core box; ~20 s when idle


# -- quick checks of the pieces (no QEMU) ------------------------------------------------


def test_boot_choice_from_cmdline() -> None:
    c = boot_choice("console=ttyAMA0 quiet pv_rev=3 pv_trying=1 pv_storage=/dev/vdb1\n")
    assert (c.revision, c.trying, c.failed_try, c.storage) == (3, True, None, "/dev/vdb1")
    c = boot_choice("pv_rev=1 pv_failed_try=2")
    assert (c.revision, c.trying, c.failed_try, c.storage) == (1, False, 2, None)
    assert boot_choice("quiet").revision is None


def test_boot_env_names_the_bsp_objects() -> None:
    k, i = "a" * 64, "b" * 64
    state = json.dumps({"revision": 1, "bsp": {"kernel": {"sha256": k, "size": 1},
                                              "initrd": {"sha256": i, "size": 1},
                                              "cmdline": "quiet\n panic=1"}}).encode()
    assert boot_env(state) == f"pv_kernel={k}\npv_initrd={i}\npv_cmdline=quiet panic=1\n".encode()
    assert boot_env(b'{"revision": 1, "containers": {}}') is None
    assert boot_env(b"not json") is None


def test_module_load_order(tmp_path: Path) -> None:
    kernel = tmp_path / "kernel"
    for rel, deps in {"fs/ext4/ext4.ko": "jbd2,mbcache,crc16", "fs/jbd2/jbd2.ko": "",
                      "fs/mbcache.ko": "", "lib/crc16.ko": "", "drivers/virtio_blk.ko": ""}.items():
        (kernel / rel).parent.mkdir(parents=True, exist_ok=True)
        (kernel / rel).write_bytes(b"\x7fELF...\0license=GPL\0depends=" + deps.encode() + b"\0")
    order = load_order(kernel, ["virtio-blk", "ext4", "crc16"])
    assert order == ["drivers/virtio_blk.ko", "fs/jbd2/jbd2.ko", "fs/mbcache.ko",
                     "lib/crc16.ko", "fs/ext4/ext4.ko"]
    with pytest.raises(DeviceError, match="not found"):
        load_order(kernel, ["nosuch"])


# -- the image, booted -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> ImageBuild:
    try:
        ensure_qemu()
    except PvpyError as e:
        pytest.skip(f"qemu-system-aarch64 cannot be installed: {e}")
    demo = DEFAULT_SPEC.parent
    if not (demo / "build" / "web").is_dir():
        subprocess.run([str(demo / "make-rootfs")], check=True)
    return build_image("qemu-arm64", tmp_path_factory.mktemp("qemu") / "img")


def _api(port: int, token: str, path: str) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


@qemu
@pytest.mark.timeout(900)
def test_image_layout(image: ImageBuild) -> None:
    assert image.disk.stat().st_size > 512 << 20
    table = json.loads(subprocess.run(["sfdisk", "-J", str(image.disk)], check=True,
                                      capture_output=True).stdout)["partitiontable"]
    assert [p["name"] for p in table["partitions"]] == ["storage", "pvmarker"]
    env = (image.out / "uboot-env.img").read_bytes()
    assert b"bootdelay=0\0" in env and b"/boot.scr" in env


@qemu
@pytest.mark.timeout(900)
def test_boot_to_goals(image: ImageBuild, tmp_path: Path) -> None:
    port = _free_port()
    token = (image.out / "api-token").read_text().strip()
    with Machine(image.out, port=port, log_path=tmp_path / "console.log") as m:
        m.wait_for(r"^U-Boot 20", 30)
        # boot.env (written by Storage.install_revision) names the signed BSP objects.
        bsp = json.loads((image.revision_dir / "state.json").read_bytes())["bsp"]
        m.wait_for(rf"pvpy-boot: rev 1 \[\] kernel {bsp['kernel']['sha256']} "
                   rf"initrd {bsp['initrd']['sha256']}", 30)
        m.wait_for(r"pvpy-boot: booti, bootargs console=ttyAMA0 quiet pv_rev=1", 30)
        m.wait_for(r'"event": "modules loaded"', BOOT_TIMEOUT)
        m.wait_for(r'"event": "storage mounted"', 30)
        m.wait_for(r'"path": "/dev/watchdog".*"event": "watchdog opened"', 30)
        m.wait_for(r'"revision": 1, "trying": false, "event": "booting revision"', BOOT_TIMEOUT)
        m.wait_for(r'"name": "hostos", "status": "STARTED"', BOOT_TIMEOUT)
        m.wait_for(r'"name": "web", "status": "READY"', BOOT_TIMEOUT)
        # The device API (PID 1's control plane, its own process) through
        # hostfwd 127.0.0.1:port -> guest :8000, with the provisioned token.
        m.wait_for(r"api serving", 60)
        status = _api(port, token, "/v1/status")
        assert status["pid"] == 1  # pvpy init is PID 1 of the guest
        assert status["revision"] == 1 and status["committed"] == 1
        assert status["all_goals_met"] is True, status
        states = {c["name"]: c["status"] for c in status["containers"]}
        assert states == {"hostos": "STARTED", "hello": "STARTED", "web": "READY"}
        assert m.find(r"Traceback") is None, "a Python traceback on the console"
    assert not m.running()


def _broken_try_revision(image: ImageBuild, out: Path) -> Path:
    """Revision 2 = revision 1 with an initrd whose /init cannot run (no pvpy ever
    starts): the kernel panics, ``panic=1`` reboots, and only U-Boot's marker
    can tell that the try failed."""
    from pvpy.signing import load_signing_key, sign_state
    from pvpy.state import canonical
    from pvpy.store import ObjectStore

    tree = out / "broken-initrd"
    tree.mkdir(parents=True)
    (tree / "init").write_text("not a program\n")  # mode 0644: execve fails, EACCES
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=tree,
                          input=b"init\n", capture_output=True, check=True).stdout
    rev2 = out / "rev2"
    objects = ObjectStore(rev2 / "objects").ensure()
    sha = objects.put_bytes(cpio)
    for src in (image.revision_dir / "objects").iterdir():
        if src.is_file() and len(src.name) == 64:
            os.link(src, rev2 / "objects" / src.name)
    doc = canonical.decode((image.revision_dir / "state.json").read_bytes())
    doc["revision"] = 2
    doc["bsp"]["initrd"] = {"sha256": sha, "size": len(cpio)}
    doc["bsp"]["cmdline"] = doc["bsp"].get("cmdline", "") + " panic=1"
    data = canonical.encode(doc)
    (rev2 / "state.json").write_bytes(data)
    assert image.key is not None
    (rev2 / "state.sig.json").write_bytes(sign_state(data, [load_signing_key(image.key)]))
    return rev2


@qemu
@pytest.mark.timeout(900)
def test_try_boot_falls_back(image: ImageBuild, tmp_path: Path) -> None:
    """An OTA push over the API of a revision that never boots: PID 1 sets pv_try and
    reboots; U-Boot writes its marker and tries 2; the kernel panics and resets; U-Boot
    sees its marker, boots 1 with pv_failed_try=2; PID 1 records ERROR, clears pv_try."""
    rev2 = _broken_try_revision(image, tmp_path)
    port = _free_port()
    token_file = image.out / "api-token"
    token = token_file.read_text().strip()
    with Machine(image.out, port=port, log_path=tmp_path / "console.log") as m:
        m.wait_for(r'"name": "web", "status": "READY"', BOOT_TIMEOUT)
        m.wait_for(r"api serving", 60)
        push = subprocess.run(
            [sys.executable, "-m", "pvpy", "device", "push", f"http://127.0.0.1:{port}",
             str(rev2), "--token-file", str(token_file), "--no-wait"],
            capture_output=True, text=True, timeout=300,
        )
        assert push.returncode == 0, push.stderr + push.stdout
        i = m.wait_for(r"pvpy-boot: trying revision 2 once \(marker written\)", BOOT_TIMEOUT)
        i = m.wait_for(r"Kernel panic", 120, i)
        i = m.wait_for(r"pvpy-boot: try 2 did not commit: falling back to 1", 60, i)
        i = m.wait_for(r"bootargs console=ttyAMA0 quiet pv_rev=1 pv_failed_try=2", 30, i)
        m.wait_for(r'"revision": 1, "trying": false, "failed_try": 2, "event": "boot choice"',
                   BOOT_TIMEOUT, i)
        m.wait_for(r'"name": "web", "status": "READY"', BOOT_TIMEOUT, i)
        m.wait_for(r"api serving", 60, i)
        deadline = time.monotonic() + 60
        while (record := _api(port, token, "/v1/revisions/2"))["status"] != "ERROR":
            assert time.monotonic() < deadline, record
            time.sleep(1)
        status = _api(port, token, "/v1/status")
        assert status["revision"] == 1 and status["committed"] == 1
        assert status["try"] is None  # cleared after the failure was recorded
    assert shutil.which("qemu-system-aarch64")
