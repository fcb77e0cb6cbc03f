"""The API's pending sizes (pvpy.device.api._staging.Pending), against a real
`pvpy device api` process (no PID 1 needed: checking a state and uploading objects
are the storage half of the API; fixtures from tests/test_api.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pvpy.signing import SigningKey, sign_state
from pvpy.state import canonical
from tests.conftest import minimal_state
from tests.device import COMMIT, HOSTOS, IDLE, SandboxDevice, app, build_revision, free_port, pvpy
from tests.device import variant as variant_app
from tests.test_api import Client, api_process, provision_token, sha, wait_api


def signed_body(revision: int, key: SigningKey, name: str, size: int) -> dict[str, str]:
    doc = minimal_state(revision)
    doc["containers"]["app"]["rootfs"] = {"sha256": name, "size": size, "format": "squashfs"}
    state = canonical.encode(doc)
    return {"state": state.decode(), "signature": sign_state(state, [key]).decode()}


def test_a_wrong_size_in_an_older_state_does_not_block_the_right_one(
    tmp_path: Path, key: SigningKey, key_dir: Path
) -> None:
    """A signed state naming an object with a wrong (larger) size, then a corrected
    one (the next revision) naming it with its real size: the upload of the real
    bytes goes through at once, not after the first state's hour is over."""
    storage, run_dir, port = tmp_path / "storage", tmp_path / "run", free_port()
    (storage / "trust").mkdir(parents=True)
    (storage / "trust" / "00-pvpy.pub").write_bytes((key_dir / "pvpy.pub").read_bytes())
    client = Client(port, provision_token(storage))
    data = b"the real object bytes"
    name = sha(data)
    with api_process(storage, run_dir, port):
        wait_api(client)
        for revision, size in ((7, len(data) + 100), (8, len(data))):
            status, doc = client.json("POST", "/v1/objects/missing",
                                      signed_body(revision, key, name, size))  # fmt: skip
            assert (status, doc["missing"]) == (200, [name]), doc
        status, doc = client.request("PUT", f"/v1/objects/{name}", data)
        assert (status, doc.get("created")) == (201, True), doc
        # the newest state's size is still enforced: another length is refused unread
        short = b"y" * 9
        status, doc = client.json("POST", "/v1/objects/missing",
                                  signed_body(9, key, sha(b"y" * 10), 10))  # fmt: skip
        assert status == 200, doc
        status, doc = client.request("PUT", f"/v1/objects/{sha(b'y' * 10)}", short)
        assert status == 422 and "10 bytes in a pending revision, not 9" in doc["error"], doc


# -- the server stays lean: verification happens in a short-lived child ----------------

# The server's own code, in a process of its own: the unix listener of pvpy.device.api
# on a socket of the test's, talking to the sandbox's PID 1; after the push the test
# asks it which heavy modules it holds.
IN_PROCESS_SERVER = """
import json, sys, threading
from pathlib import Path
from pvpy.device.api._endpoints import Api
from pvpy.device.api._limits import Limits
from pvpy.device.api._listeners import open_unix
from pvpy.device.api._token import Token
from pvpy.store import Storage
storage, run_dir, sock = map(Path, sys.argv[1:4])
server = open_unix(Api(Storage(storage), run_dir, Token(None), Limits()), sock)
threading.Thread(target=server.serve_forever, daemon=True).start()
print("serving", flush=True)
sys.stdin.readline()
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("cryptography", "jsonschema"))
print(json.dumps(heavy), flush=True)
"""

# Shared objects of the crypto library and of jsonschema's compiled dependency (pure
# python otherwise): rpds (jsonschema >= 4.18) or pyrsistent's pvectorc (Debian's 4.10).
HEAVY_LIBRARIES = ("_rust.abi3.so", "/rpds", "pvectorc")


def api_helper_pid(storage: Path) -> int:
    """The `pvpy device api` process PID 1 keeps for this storage."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"api" in argv and b"--storage" in argv and str(storage).encode() in argv:
            return int(entry.name)
    raise AssertionError("no API helper running")


def mapped_heavy_libraries(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted({line.split()[-1] for line in maps.splitlines()
                   if any(lib in line for lib in HEAVY_LIBRARIES)})  # fmt: skip


@pytest.mark.root
def test_the_api_server_keeps_no_crypto_or_schema_library_after_a_push(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    """Pushes verify in a short-lived child: the long-lived API helper never maps the
    crypto library, nor does the server's code hold cryptography or jsonschema after
    serving a whole push (missing objects, uploads, install, PID 1's apply)."""
    base: dict[str, Any] = {"hostos": HOSTOS, "steady": app(IDLE)}
    v1 = build_revision(tmp_path, signing_dir, 1, base)
    v2, v3 = (
        build_revision(tmp_path, signing_dir, n, {
            **base, "web": variant_app(tmp_path, f"v{n}", f"echo web v{n}; " + IDLE)})
        for n in (2, 3)
    )  # fmt: skip
    device: SandboxDevice = sandbox(v1, *COMMIT, "--api")
    device.wait_goals()
    sock = device.run_dir / "api.sock"
    out = pvpy("device", "push", f"unix:{sock}", v2, timeout=180)
    assert "revision 2: UPDATED" in out.stdout, out.stdout + out.stderr
    helper = api_helper_pid(device.storage)
    assert mapped_heavy_libraries(helper) == []

    mine = tmp_path / "server.sock"
    server = subprocess.Popen(
        [sys.executable, "-c", IN_PROCESS_SERVER, str(device.storage), str(device.run_dir),
         str(mine)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PVPY_LOG_LEVEL": "warning"},
    )  # fmt: skip
    try:
        assert server.stdout is not None and server.stdin is not None
        assert server.stdout.readline().strip() == "serving"
        out = pvpy("device", "push", f"unix:{mine}", v3, timeout=180)
        assert "revision 3: UPDATED" in out.stdout, out.stdout + out.stderr
        assert mapped_heavy_libraries(server.pid) == []
        server.stdin.write("report\n")
        server.stdin.flush()
        assert json.loads(server.stdout.readline()) == []
    finally:
        server.kill()
        server.wait()
    assert device.status()["revision"] == 3
