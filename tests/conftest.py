"""Shared fixtures: keys and small signed revisions built without mksquashfs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pvpy.signing import SigningKey, generate_key, sign_state
from pvpy.state import canonical
from pvpy.store import SIGNATURE_FILE, STATE_FILE, ObjectStore


def minimal_state(revision: int = 1, **extra: Any) -> dict[str, Any]:
    """A valid state document whose rootfs objects are not stored anywhere."""
    doc: dict[str, Any] = {
        "#spec": "pvpy-state@1",
        "revision": revision,
        "containers": {
            "app": {
                "rootfs": {"sha256": "a" * 64, "size": 1, "format": "squashfs"},
                "args": ["/bin/true"],
            }
        },
    }
    doc.update(extra)
    return doc


def write_revision(
    out: Path,
    revision: int,
    keys: list[SigningKey],
    blobs: dict[str, bytes] | None = None,
    **extra: Any,
) -> Path:
    """A signed revision dir: one container per blob, each blob an object."""
    blobs = blobs if blobs is not None else {"app": b"rootfs of app r%d" % revision}
    store = ObjectStore(out / "objects").ensure()
    containers = {}
    for name, data in blobs.items():
        sha = store.put_bytes(data)
        containers[name] = {
            "rootfs": {"sha256": sha, "size": len(data), "format": "squashfs"},
            "args": ["/bin/sh"],
        }
    doc: dict[str, Any] = {"#spec": "pvpy-state@1", "revision": revision, "containers": containers}
    doc.update(extra)
    data = canonical.encode(doc)
    (out / STATE_FILE).write_bytes(data)
    (out / SIGNATURE_FILE).write_bytes(sign_state(data, keys))
    return out


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    return generate_key(tmp_path / "key")


@pytest.fixture
def key_dir(tmp_path: Path, key: SigningKey) -> Path:
    return tmp_path / "key"


@pytest.fixture(scope="session")
def demo_trees() -> Path:
    """The busybox rootfs trees of examples/demo (built once per session)."""
    import shutil
    import subprocess

    from tests.device import DEMO, need_root_tools

    need_root_tools()
    if shutil.which("mksquashfs") is None:
        pytest.skip("squashfs-tools not installed")
    subprocess.run([DEMO / "make-rootfs"], check=True)
    return DEMO / "build"


@pytest.fixture
def signing_dir(tmp_path: Path) -> Path:
    generate_key(tmp_path / "signing")
    return tmp_path / "signing"


@pytest.fixture
def sandbox(tmp_path: Path, demo_trees: Path, signing_dir: Path) -> Any:
    """Make and boot sandbox devices; all are powered off (or killed) at the end."""
    from tests.device import SandboxDevice, pvpy

    made: list[SandboxDevice] = []

    def boot(
        revision_dir: Path,
        *extra: str,
        name: str = "dev",
        env: dict[str, str] | None = None,
        trust: Path | None = None,
    ) -> SandboxDevice:
        storage = tmp_path / name
        pvpy(
            "device",
            "provision",
            "--storage",
            storage,
            "--state",
            revision_dir,
            "--trust",
            trust or signing_dir / "pvpy.pub",
        )
        device = SandboxDevice(storage, tmp_path / f"{name}.log")
        made.append(device)
        return device.start(*extra, env=env)

    yield boot
    for device in made:
        device.kill()
