"""The pvpy CLI as a user runs it: real processes, exit codes, one-line errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "examples" / "demo"


def pvpy(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pvpy", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PVPY_DEBUG": ""},
        timeout=120,
    )


def ok(*args: str | Path) -> str:
    result = pvpy(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def fails(code: int, *args: str | Path) -> str:
    result = pvpy(*args)
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pvpy: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["key"],
        ["key", "gen"],
        ["key", "keyset"],
        ["state"],
        ["state", "build"],
        ["state", "sign"],
        ["state", "verify"],
        ["state", "show"],
        ["device"],
        ["device", "provision"],
        ["device", "run"],
        ["device", "status"],
        ["device", "update"],
        ["device", "rollback"],
        ["device", "push"],
        ["device", "logs"],
        ["device", "api"],
        ["device", "restart"],
        ["device", "reboot"],
    ],
)
def test_help_everywhere(command: list[str]) -> None:
    result = pvpy(*command, "--help")
    assert result.returncode == 0
    assert "usage: pvpy" in result.stdout


@pytest.fixture(scope="module")
def demo_rootfs() -> Path:
    if shutil.which("mksquashfs") is None or not Path("/bin/busybox").exists():
        pytest.skip("needs squashfs-tools and busybox-static (tools/setup installs them)")
    subprocess.run([DEMO / "make-rootfs"], check=True)
    return DEMO


def test_build_sign_verify_show_tamper(tmp_path: Path, demo_rootfs: Path) -> None:
    keys, rev = tmp_path / "keys", tmp_path / "rev"
    out = ok("key", "gen", "--out", keys)
    assert "key id" in out
    fails(6, "key", "gen", "--out", keys)  # never overwrite a key

    out = ok("state", "build", demo_rootfs / "spec.yaml", "--out", rev)
    assert "built revision 1: 3 container(s)" in out
    line = fails(3, "state", "verify", rev, "--trust", keys / "pvpy.pub")
    assert "not signed" in line

    ok("state", "sign", rev, "--key", keys)
    out = ok("state", "verify", rev, "--trust", keys / "pvpy.pub")
    assert out.startswith("OK: revision 1 signed by")

    out = ok("state", "show", rev)
    assert "hostos  host-os  root" in out and "web     app      app    READY" in out

    # replayed against a device already at revision 1
    line = fails(3, "state", "verify", rev, "--trust", keys / "pvpy.pub", "--current", "1")
    assert "not newer" in line

    # an unknown key
    ok("key", "gen", "--out", tmp_path / "other")
    line = fails(3, "state", "verify", rev, "--trust", tmp_path / "other" / "pvpy.pub")
    assert "untrusted key" in line

    # a flipped byte in a rootfs object
    obj = next(p for p in (rev / "objects").iterdir() if not p.name.startswith("."))
    os.chmod(obj, 0o644)
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF
    obj.write_bytes(bytes(data))
    line = fails(5, "state", "verify", rev, "--trust", keys / "pvpy.pub")
    assert "corrupt" in line


def test_rebuild_drops_stale_signature(tmp_path: Path, demo_rootfs: Path) -> None:
    keys, rev = tmp_path / "keys", tmp_path / "rev"
    ok("key", "gen", "--out", keys)
    ok("state", "build", demo_rootfs / "spec.yaml", "--out", rev)
    ok("state", "sign", rev, "--key", keys)
    out = ok("state", "build", demo_rootfs / "spec.yaml", "--out", rev, "--revision", "2")
    assert "(0 new)" in out  # same trees, same objects
    assert not (rev / "state.sig.json").exists()


def test_bad_spec_gives_one_line_and_exit_4(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "revision: 1\ncontainers:\n  app:\n    rootfs: nowhere\n    args: [x]\n"
        "    restart: {policy: sometimes}\n"
    )
    line = fails(4, "state", "build", spec, "--out", tmp_path / "out")
    assert "$.containers.app.restart.policy" in line
    spec.write_text("revision: 1\ncontainers:\n  app:\n    rootfs: nowhere\n    args: [x]\n")
    line = fails(4, "state", "build", spec, "--out", tmp_path / "out")
    assert "no such file or directory" in line
    spec.write_text("revision: [\n")
    assert "invalid YAML" in fails(4, "state", "build", spec, "--out", tmp_path / "out")


def test_missing_inputs_are_clear(tmp_path: Path) -> None:
    assert "no readable state.json" in fails(2, "state", "sign", tmp_path, "--key", tmp_path)
    line = fails(6, "state", "verify", tmp_path, "--trust", tmp_path / "nope.pub")
    assert "nope.pub: No such file" in line
    (tmp_path / "garbage.pub").write_text("not a key")
    line = fails(6, "state", "verify", tmp_path, "--trust", tmp_path / "garbage.pub")
    assert "not a PEM public key" in line
    ok("key", "gen", "--out", tmp_path / "k")
    line = fails(5, "state", "verify", tmp_path, "--trust", tmp_path / "k")
    assert "not a revision directory" in line
    (tmp_path / "state.json").write_text("{}")
    line = fails(4, "state", "sign", tmp_path, "--key", tmp_path / "k")
    assert line.startswith("pvpy: error: $: ")


def test_usage_errors_exit_2() -> None:
    result = pvpy("state", "frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_provision_makes_a_private_api_token(tmp_path: Path, demo_rootfs: Path) -> None:
    keys, rev = tmp_path / "keys", tmp_path / "rev"
    ok("key", "gen", "--out", keys)
    ok("state", "build", demo_rootfs / "spec.yaml", "--out", rev)
    ok("state", "sign", rev, "--key", keys)
    out = ok(
        "device",
        "provision",
        "--storage",
        tmp_path / "dev",
        "--state",
        rev,
        "--trust",
        keys / "pvpy.pub",
    )
    token = tmp_path / "dev" / "config" / "api-token"
    assert str(token) in out
    assert oct(token.stat().st_mode & 0o777) == "0o600" and len(token.read_text().strip()) >= 24
    line = fails(
        10,
        "device",
        "provision",
        "--storage",
        tmp_path / "dev",
        "--state",
        rev,
        "--trust",
        keys / "pvpy.pub",
    )
    assert "already holds revisions" in line


def test_device_status_wants_one_device() -> None:
    assert "one of them" in fails(2, "device", "status")
    assert "one of them" in fails(2, "device", "status", "unix:/nowhere.sock", "--storage", "/x")


@pytest.mark.parametrize(
    "command",
    [["status"], ["reboot"], ["restart", "web"], ["rollback"]],
)
def test_local_verbs_without_a_running_sandbox(tmp_path: Path, command: list[str]) -> None:
    line = fails(10, "device", *command, "--storage", tmp_path)
    assert "no device answers" in line


def test_boot_verifier_loads_no_workstation_code(tmp_path: Path) -> None:
    # PID 1 runs `device verify-installed` at every boot: its imports are boot time
    code = (
        "import sys; from pvpy.cli import main; "
        f"main(['device', 'verify-installed', '--storage', {str(tmp_path)!r}, '--revision', '1']); "
        "print(sorted(m for m in sys.modules if m.startswith(('pvpy.workstation', 'structlog'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
