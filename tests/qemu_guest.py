"""A booted qemu-arm64 guest as the QEMU tests drive it: the image's demo trees,
the guest and its API over the forwarded port, revisions derived from a signed
one. Shared by tests/test_qemu.py and the QEMU soak (tests/soak/qemu.py)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvpy.errors import PvpyError
from pvpy.store import ObjectStore
from pvpy.workstation.image import DEFAULT_SPEC, ImageBuild
from pvpy.workstation.qemu import Machine
from tests import apiclient

BOOT_TIMEOUT = 180.0  # TCG on a busy 2-core box; ~20 s when idle
PUSH_TIMEOUT = 600.0  # a try-boot: upload, reboot, boot, the 25 s commit delay
UBOOT = r"^U-Boot 20"
BUSYBOX_TREE = DEFAULT_SPEC.parents[2] / "rootfs" / "busybox-tree"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def demo_specs(work: Path) -> Path:
    """examples/demo's specs in ``work`` with their rootfs trees built there, as
    make-rootfs does (a demo running meanwhile rebuilds examples/demo/build in
    place). Returns the directory; its spec.yaml is the factory spec."""
    for spec in DEFAULT_SPEC.parent.glob("spec*.yaml"):
        shutil.copy(spec, work / spec.name)
    for overlay in sorted((DEFAULT_SPEC.parent / "overlays").iterdir()):
        busybox_tree(work / "build" / overlay.name, overlay)
    return work


def busybox_tree(out: Path, *overlays: Path) -> Path:
    """A busybox root tree (rootfs/busybox-tree) with the overlays copied over it."""
    subprocess.run([str(BUSYBOX_TREE), str(out), *map(str, overlays)], check=True)
    return out


@dataclass
class Guest:
    """The booted image, its API through hostfwd, and the revisions sent to it."""

    image: ImageBuild
    machine: Machine
    port: int
    work: Path
    revisions: dict[int, Path] = field(default_factory=dict)  # number -> signed dir
    highest: int = 1  # the highest revision ever sent (anti-rollback)
    boots: int = 1  # the boots the tests caused so far (the first one included)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def token_file(self) -> Path:
        return self.image.out / "api-token"

    def api(self, path: str, method: str = "GET") -> Any:
        return apiclient.api(self.url, self.token_file, path, method)

    def text(self, path: str, timeout: float = 10.0) -> str:
        """A text reply (a log), or PvpyError (RemoteError) while the device is away."""
        conn, response = apiclient.device(self.url, self.token_file, timeout).open(
            "GET", path, headers={"Accept": "text/plain"}
        )
        try:
            return response.read().decode(errors="replace")
        except (OSError, ValueError) as e:
            raise PvpyError(f"{self.url}{path}: the reply broke off ({e})") from e
        finally:
            conn.close()

    def settled(self, revision: int | None = None, timeout: float = BOOT_TIMEOUT) -> Any:
        """/v1/status once the guest runs ``revision`` (any: None) with all goals met
        and no update or shutdown under way; the API may be away (rebooting) meanwhile."""
        deadline = time.monotonic() + timeout
        status: Any = None
        while True:
            try:
                status = self.api("/v1/status")
            except PvpyError:
                status = None
            if (
                status
                and status["all_goals_met"]
                and status["updating"] is None
                and not status["pending"]
                and (revision is None or status["revision"] == revision)
            ):
                return status
            assert self.machine.running(), f"qemu exited ({self.machine.log_path})"
            assert time.monotonic() < deadline, f"not settled on {revision}: {status}"
            time.sleep(1)

    def running(self) -> tuple[int, Path]:
        """The revision the guest runs and its signed directory on the host."""
        number = int(self.settled()["revision"])
        return number, self.revisions[number]

    def next_revision(self) -> int:
        self.highest += 1
        return self.highest

    def push_argv(self, revision_dir: Path, wait: bool = True) -> list[str]:
        """``pvpy device push`` of ``revision_dir`` to the guest (following it to its end)."""
        follow = ["--timeout", str(PUSH_TIMEOUT)] if wait else ["--no-wait"]
        return [sys.executable, "-m", "pvpy", "device", "push", self.url, str(revision_dir),
                "--token-file", str(self.token_file), *follow]  # fmt: skip

    def push(self, revision_dir: Path, wait: bool = True) -> subprocess.CompletedProcess[str]:
        """``pvpy device push`` from the host (following the revision to its end)."""
        return subprocess.run(self.push_argv(revision_dir, wait), capture_output=True,
                              text=True, timeout=PUSH_TIMEOUT + 60)  # fmt: skip

    def banners(self) -> int:
        """How often U-Boot started: one per boot, whatever caused it."""
        return sum(1 for _, line in self.machine.lines if re.search(UBOOT, line))

    def record(self, revision: int) -> Any:
        return self.api(f"/v1/revisions/{revision}")


def derive_revision(
    base: Path, out: Path, revision: int, key: Path,
    edit: Callable[[dict[str, Any], ObjectStore], None],
) -> Path:  # fmt: skip
    """Revision ``revision`` = the signed revision in ``base`` as ``edit`` changes its
    state (adding any new object to the given store), signed with ``key`` (the
    image's). The objects it shares with ``base`` are hard links."""
    from pvpy.signing import load_signing_key, sign_state
    from pvpy.state import canonical, parse_unverified

    objects = ObjectStore(out / "objects").ensure()
    doc = canonical.decode((base / "state.json").read_bytes())
    doc["revision"] = revision
    edit(doc, objects)
    data = canonical.encode(doc)
    for sha in parse_unverified(data).objects():
        if not (out / "objects" / sha).exists():
            os.link(base / "objects" / sha, out / "objects" / sha)
    (out / "state.json").write_bytes(data)
    (out / "state.sig.json").write_bytes(sign_state(data, [load_signing_key(key)]))
    return out


def cpio(tree: Path, files: dict[str, bytes | str]) -> bytes:
    """A newc archive of ``files`` (name -> content; str content: mode 0644)."""
    for name, content in files.items():
        path = tree / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
    return subprocess.run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=tree,
                          input="".join(f"{n}\n" for n in files).encode(),
                          capture_output=True, check=True).stdout  # fmt: skip
