"""The pvpy CLI as a user runs it: real processes, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pvpy.state import canonical
from tests.conftest import minimal_state

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "examples" / "demo"


# No saved device nor default of the user running the tests leaks in
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PVPY_DEVICE", "PVPY_DEVICES_FILE")}


def pvpy(
    *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pvpy", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**CLEAN_ENV, "PVPY_DEBUG": "", "XDG_CONFIG_HOME": "/nonexistent", **(env or {})},
        timeout=120,
    )


def ok(*args: str | Path, env: dict[str, str] | None = None) -> str:
    result = pvpy(*args, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def fails(code: int, *args: str | Path, env: dict[str, str] | None = None) -> str:
    result = pvpy(*args, env=env)
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
    assert oct(token.stat().st_mode & 0o777) == "0o600"
    # the credentials: a token and the pin of the device's TLS certificate (key 0600)
    from pvpy.api_credentials import certificate_sha256, read_credentials

    credentials = read_credentials(token)
    cert, key = (
        tmp_path / "dev" / "config" / "api-cert.pem",
        tmp_path / "dev" / "config" / "api-key.pem",
    )
    assert len(credentials.token) >= 24 and oct(key.stat().st_mode & 0o777) == "0o600"
    assert credentials.tls_sha256 == certificate_sha256(cert.read_bytes())
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
    assert "which device?" in fails(2, "device", "status")
    assert "one of them" in fails(2, "device", "status", "unix:/nowhere.sock", "--storage", "/x")
    assert "no saved device 'lab'" in fails(2, "device", "status", "lab")


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


def test_a_wrong_token_file_is_named_never_shown(tmp_path: Path) -> None:
    """A private key given as --token-file by mistake: exit 2, one line naming the file
    and what is wrong; nothing of what it holds (the key went to stderr before)."""
    from pvpy.signing import PRIVATE_KEY_FILE

    ok("key", "gen", "--out", tmp_path / "keys")
    key = tmp_path / "keys" / PRIVATE_KEY_FILE
    secret_lines = [ln for ln in key.read_text().splitlines() if "-----" not in ln]
    short = tmp_path / "short"
    short.write_text("s3cr3t\n")
    spaced = tmp_path / "spaced"
    spaced.write_text("token: abcdefgh ijklmnopqrstuvwxyz\n")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\x89PNG\r\n\x1a\nsecretsecretsecret")
    for wrong, why in ((key, "PEM key"), (short, "16 to 512 characters"),
                       (spaced, "printable ASCII"), (binary, "not ASCII")):  # fmt: skip
        for verb in ("status", "logs"):
            line = fails(2, "device", verb, "https://127.0.0.1:9", "--token-file", wrong)
            assert str(wrong) in line and why in line, line
            assert "BEGIN" not in line and "s3cr3t" not in line and "secretsecret" not in line
            assert not any(secret in line for secret in secret_lines)
    line = fails(2, "device", "push", "https://127.0.0.1:9", tmp_path, "--token-file", key)
    assert "PEM key" in line
    line = fails(2, "device", "status", "https://127.0.0.1:9", "--token", "has a space s3cr3t")
    assert "--token" in line and "s3cr3t" not in line


def test_bad_workstation_input_is_one_line_never_exit_70(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory\n")
    (tmp_path / "not-a-rev").mkdir()
    bad_state = tmp_path / "bad-state"
    bad_state.mkdir()
    (bad_state / "state.json").write_bytes(b"\xff\xfe not utf-8")
    assert "not a directory" in fails(2, "key", "gen", "--out", tmp_path / "a-file")
    assert "no readable state.json" in fails(2, "state", "show", tmp_path / "not-a-rev", "--json")
    fails(4, "state", "show", bad_state, "--json")
    ok("key", "gen", "--out", tmp_path / "keys")
    rev = tmp_path / "rev"
    rev.mkdir()
    (rev / "state.json").write_bytes(canonical.encode(minimal_state()))
    assert "--keyset" in fails(2, "state", "sign", rev, "--key", tmp_path / "keys",
                               "--keyset", tmp_path / "no-such-keyset")  # fmt: skip


# -- one way to name a device (pvpy.devices) ------------------------------------------


def test_named_devices(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    saved = tmp_path / "config" / "pvpy" / "devices.json"
    out = ok("device", "add", "lab", "https://127.0.0.1:9", env=env)
    assert "saved lab (https://127.0.0.1:9)" in out and "next: pvpy device status lab" in out
    ok("device", "add", "bench", "--storage", tmp_path / "dev", env=env)
    assert oct(saved.stat().st_mode & 0o777) == "0o600"
    assert oct(saved.parent.stat().st_mode & 0o777) == "0o700"
    docs = [json.loads(line) for line in ok("device", "list", "--json", env=env).splitlines()]
    assert docs == [
        {"name": "bench", "storage": str(tmp_path / "dev"), "default": False},
        {"name": "lab", "url": "https://127.0.0.1:9", "default": False},
    ]
    assert ok("device", "list", "-q", env=env).split() == ["bench", "lab"]
    # every device verb takes the name: a URL device is reached over the API...
    for verb in (["status"], ["history"], ["logs"], ["reboot"], ["restart", "web"]):
        line = fails(10, "device", verb[0], "lab", *verb[1:], env=env)
        assert "https://127.0.0.1:9: cannot reach the device" in line, line
    # ...a storage device over its control socket, or its files when it is off
    for verb in (["status"], ["poweroff"], ["restart", "web"], ["rollback"], ["update", "rev/"]):
        line = fails(10, "device", verb[0], "bench", *verb[1:], env=env)
        assert "no device answers" in line, line
    assert "no log of container 'web'" in fails(2, "device", "logs", "bench", "web", env=env)
    # PVPY_DEVICE: the default; a container named alone stays a container
    line = fails(10, "device", "restart", "web", env={**env, "PVPY_DEVICE": "lab"})
    assert "127.0.0.1:9" in line
    line = fails(2, "device", "logs", "web", env={**env, "PVPY_DEVICE": "bench"})
    assert "no log of container 'web'" in line
    # stop and rollback go over the API too (tests/test_api.py runs them on a device)
    assert "127.0.0.1:9" in fails(10, "device", "stop", "lab", "web", env=env)
    assert "127.0.0.1:9" in fails(10, "device", "rollback", "lab", env=env)
    # bad input: one line, nothing saved
    before = saved.read_bytes()
    assert "a device name is" in fails(2, "device", "add", "9lives", "https://x:1", env=env)
    assert "one of them" in fails(2, "device", "add", "x", env=env)
    assert "must be http(s)" in fails(2, "device", "add", "x", "ftp://h", env=env)
    line = fails(2, "device", "add", "x", "https://h:1", "--token-file", tmp_path / "no", env=env)
    assert "no" in line
    assert saved.read_bytes() == before
    assert ok("device", "remove", "lab", env=env) == "removed lab\n"
    assert "no saved device 'lab'" in fails(2, "device", "remove", "lab", env=env)
    saved.write_text("not json")
    assert "cannot read the saved devices" in fails(2, "device", "status", "bench", env=env)


def test_version_and_completion(tmp_path: Path) -> None:
    from pvpy import __version__

    assert ok("--version") == f"pvpy {__version__}\n"
    for shell in ("bash", "zsh"):
        assert "complete -o filenames -F _pvpy pvpy" in ok("completion", shell)
    script = tmp_path / "pvpy-completion.bash"
    script.write_text(ok("completion", "bash"))

    def complete(*words: str) -> list[str]:
        line = " ".join(("pvpy", *words))
        probe = (f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words)}; _pvpy; "
                 'printf "%s\\n" "${COMPREPLY[@]}"')  # fmt: skip
        out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
        return out.stdout.split()

    assert complete("dev") == ["device"]
    assert {"push", "pull", "provision"} <= set(complete("device", "p"))
    assert "--no-trunc" in complete("device", "status", "--no")
    assert complete("completion", "z") == ["zsh"]


def test_json_on_the_verbs_that_print_data(tmp_path: Path, demo_rootfs: Path) -> None:
    keys, rev = tmp_path / "keys", tmp_path / "rev"
    doc = json.loads(ok("key", "gen", "--out", keys, "--json"))
    assert len(doc["keyid"]) == 64 and doc["public"].endswith("pvpy.pub")
    doc = json.loads(ok("state", "build", demo_rootfs / "spec.yaml", "--out", rev, "--json"))
    assert doc["revision"] == 1 and doc["containers"] == 3
    assert json.loads(ok("state", "sign", rev, "--key", keys, "--json"))["revision"] == 1
    doc = json.loads(ok("state", "verify", rev, "--trust", keys / "pvpy.pub", "--json"))
    assert doc["ok"] is True and doc["objects"] == 3
    storage = tmp_path / "dev"
    doc = json.loads(ok("device", "provision", "--storage", storage, "--state", rev, "--trust",
                        keys / "pvpy.pub", "--json"))  # fmt: skip
    assert doc["revision"] == 1
    # a device that is off: what is installed, offline, exit 0
    out = ok("device", "status", "--storage", storage)
    assert "not running" in out and "installed  1" in out and "next boot  1" in out
    doc = json.loads(ok("device", "status", "--storage", storage, "--json"))
    assert doc["offline"] is True and doc["installed"] == [1]
    out = ok("device", "history", "--storage", storage)
    assert "factory revision" in out
    row = json.loads(ok("device", "history", "--storage", storage, "--json"))
    assert row["revision"] == 1 and row["installed"] is True
    # --no-trunc: state show cuts ARGS at 40 with an ellipsis, or not at all
    cut = ok("state", "show", rev)
    assert "127.0.0.1:8080 -h…" in cut and "/www" not in cut
    assert "-h /www" in ok("state", "show", rev, "--no-trunc")


def test_durations_and_times_for_logs() -> None:
    from pvpy.errors import UsageError
    from pvpy.timespec import parse_when

    now = 1_000_000.0
    assert parse_when("10m", "--since", now) == now - 600
    assert parse_when("1h30m", "--since", now) == now - 5400
    assert parse_when("45s", "--since", now) == now - 45
    assert parse_when("2d", "--since", now) == now - 172800
    assert parse_when("1764671387", "--since", now) == 1764671387
    assert parse_when("2026-12-02T10:00:00Z", "--until", now) == 1796205600
    assert parse_when(None, "--since") is None
    for bad in ("yesterday", "10x", ""):
        with pytest.raises(UsageError, match="--since"):
            parse_when(bad, "--since", now)
