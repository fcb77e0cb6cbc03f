"""Pull mode (pvpy.oci, pvpy.workstation.publish, pvpy.device.puller): `pvpy state publish` and `pvpy device pull`.

Against a real registry: Debian's docker-registry (distribution 2.8) started
here on 127.0.0.1 with its storage in tmp_path, stopped at the end. The root
test boots a real sandbox device and runs the puller as its own process, as
PID 1 would.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pvpy import oci as reg
from pvpy.errors import RegistryError, UsageError
from pvpy.registry import Registry
from pvpy.signing import SigningKey, generate_key
from pvpy.workstation import publish as pub
from tests.conftest import write_revision
from tests.device import (
    COMMIT,
    HOSTOS,
    IDLE,
    SandboxDevice,
    app,
    build_revision,
    free_port,
    pvpy,
    variant,
)


class RegistryProcess:
    """`docker-registry serve CONFIG` on 127.0.0.1:<port>, storage under ``root``."""

    def __init__(self, root: Path, auth: str = "") -> None:
        self.root = root
        self.port = free_port()
        self.data = root / "data"
        self.config = root / "config.yml"
        self.log = root / "registry.log"
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            "version: 0.1\n"
            "log: {level: info}\n"
            f"storage: {{filesystem: {{rootdirectory: {self.data}}}, delete: {{enabled: true}}}}\n"
            f"http: {{addr: '127.0.0.1:{self.port}'}}\n" + auth
        )

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> RegistryProcess:
        log = open(self.log, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(["docker-registry", "serve", str(self.config)],
                                     stdout=log, stderr=log)  # fmt: skip
        log.close()
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/v2/")
                if conn.getresponse().status in (200, 401):  # 401: it wants a token
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"docker-registry did not start:\n{self.log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def blob_file(self, digest: str) -> Path:
        hexa = digest.removeprefix("sha256:")
        return self.data / "docker/registry/v2/blobs/sha256" / hexa[:2] / hexa / "data"

    def manifest(self, repo: str, tag: str) -> dict[str, Any]:
        client = Registry(self.host, plain_http=True)
        data, _ = client.get_manifest(repo, tag)
        doc: dict[str, Any] = json.loads(data)
        return doc

    def tags(self, repo: str) -> list[str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        conn.request("GET", f"/v2/{repo}/tags/list")
        return sorted(json.loads(conn.getresponse().read())["tags"])


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryProcess]:
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry not installed (tools/setup installs it)")
    server = RegistryProcess(tmp_path / "registry").start()
    try:
        yield server
    finally:
        server.stop()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- without a device --------------------------------------------------------------------


def test_references() -> None:
    r = reg.Reference.parse("127.0.0.1:5000/fleet/demo:stable")
    assert (r.registry, r.repository, r.tag) == ("127.0.0.1:5000", "fleet/demo", "stable")
    assert str(r) == "127.0.0.1:5000/fleet/demo:stable"
    assert reg.Reference.parse("registry.example/demo:7").tag == "7"
    for bad in ("demo:stable", "127.0.0.1:5000/demo", "127.0.0.1:5000/Demo:x",
                "127.0.0.1:5000/demo:../x", "127.0.0.1:5000/de..mo:x", "127.0.0.1:5000/demo:",
                "h/x/../y:t", "a b/demo:x", "127.0.0.1:5000/demo:-x"):  # fmt: skip
        with pytest.raises(UsageError):
            reg.Reference.parse(bad)


def test_publish_sends_only_missing_blobs(
    tmp_path: Path, registry: RegistryProcess, key: SigningKey
) -> None:
    shared, old, new = b"shared rootfs " * 1000, b"app r1 " * 500, b"app r2 " * 700
    r1 = write_revision(tmp_path / "r1", 1, [key], {"base": shared, "app": old})
    r2 = write_revision(tmp_path / "r2", 2, [key], {"base": shared, "app": new})
    client = Registry(registry.host, plain_http=True)
    ref = reg.Reference.parse(f"{registry.host}/fleet/demo:stable")
    lines: list[str] = []

    first = pub.publish(client, ref, r1, say=lines.append)
    state1 = (r1 / "state.json").read_bytes()
    sig1 = (r1 / "state.sig.json").read_bytes()
    # config, state, signature, two objects: all new
    assert (first.revision, first.blobs, first.sent_blobs) == (1, 5, 5)
    assert first.sent_bytes == len(b"{}") + len(state1) + len(sig1) + len(shared) + len(old)
    assert first.tags == ["stable", "1"]

    second = pub.publish(client, ref, r2, say=lines.append)
    state2, sig2 = (r2 / "state.json").read_bytes(), (r2 / "state.sig.json").read_bytes()
    # the shared object and the config are already there: state, signature, one object
    assert (second.blobs, second.sent_blobs) == (5, 3)
    assert second.sent_bytes == len(state2) + len(sig2) + len(new)
    assert "5 blob(s), 3 missing" in lines[-2]

    again = pub.publish(client, ref, r2, say=lines.append)
    assert (again.sent_blobs, again.sent_bytes, again.digest) == (0, 0, second.digest)

    # what the registry holds: an OCI 1.1 artifact, kept as sent by distribution 2.8
    assert registry.tags("fleet/demo") == ["1", "2", "stable"]
    doc = registry.manifest("fleet/demo", "stable")
    assert doc["artifactType"] == reg.ARTIFACT_TYPE and doc["mediaType"] == reg.MANIFEST_TYPE
    assert doc["config"]["mediaType"] == reg.EMPTY_TYPE
    assert doc["annotations"] == {"org.pvpy.revision": "2"}
    roles = [(layer["annotations"]["org.pvpy.role"], layer["digest"]) for layer in doc["layers"]]
    assert roles[:2] == [("state", "sha256:" + sha(state2)), ("signature", "sha256:" + sha(sig2))]
    assert {d for r, d in roles[2:] if r == "object"} == {
        "sha256:" + sha(shared),
        "sha256:" + sha(new),
    }
    # an object's blob is its object: same name, same bytes
    assert registry.blob_file("sha256:" + sha(new)).read_bytes() == new

    # bytes that do not hash to their name: the registry itself refuses them
    bad = write_revision(tmp_path / "bad", 3, [key], {"app": b"good bytes"})
    (bad / "objects" / sha(b"good bytes")).write_bytes(b"evil bytes")
    with pytest.raises(RegistryError, match="DIGEST_INVALID"):
        pub.publish(client, ref, bad, say=lines.append)
    assert registry.manifest("fleet/demo", "stable")["annotations"]["org.pvpy.revision"] == "2"
    # the CLI: same thing, exit 0; a registry that is not there: exit 11
    out = pvpy("state", "publish", r1, f"{registry.host}/fleet/other:stable", "--plain-http")
    assert "sent 5 blob(s)" in out.stdout
    # --json: one document on stdout (progress on stderr); nothing left to send now
    out = pvpy("state", "publish", r1, f"{registry.host}/fleet/other:stable", "--plain-http",
               "--json")  # fmt: skip
    doc = json.loads(out.stdout)
    assert doc["revision"] == 1 and doc["sent_blobs"] == 0 and doc["digest"].startswith("sha256:")
    out = pvpy(
        "state", "publish", r1, f"127.0.0.1:{free_port()}/fleet/demo:x", "--plain-http", check=False
    )
    assert out.returncode == 11 and "cannot reach the registry" in out.stderr


def test_manifests_that_are_not_revisions() -> None:
    good = pub.make_manifest(3, [pub.Blob("state", reg.STATE_TYPE, "sha256:" + "a" * 64, 1),
                                 pub.Blob("signature", reg.SIGNATURE_TYPE, "sha256:" + "b" * 64, 1)])  # fmt: skip
    assert set(reg.parse_manifest_unverified(good)) == {"state", "signature"}
    doc = json.loads(good)
    for broken in (
        {**doc, "artifactType": "application/vnd.other"},
        {**doc, "layers": doc["layers"][:1]},
        {**doc, "layers": [*doc["layers"], doc["layers"][0]]},
        {"layers": 1},
        {**doc, "layers": [{**doc["layers"][0], "digest": "sha256:../../x"}, doc["layers"][1]]},
    ):
        with pytest.raises(RegistryError, match="not a pvpy revision"):
            reg.parse_manifest_unverified(json.dumps(broken).encode())
    with pytest.raises(RegistryError):
        reg.parse_manifest_unverified(b"\xff")


# -- with a sandbox device ---------------------------------------------------------------


def pids(status: dict[str, Any]) -> dict[str, int]:
    return {c["name"]: c["pid"] for c in status["containers"]}


def records(storage: Path) -> dict[int, dict[str, Any]]:
    return {int(p.stem): json.loads(p.read_text()) for p in (storage / "progress").glob("*.json")
            if p.stem.isdigit()}  # fmt: skip


def stored_objects(storage: Path) -> tuple[set[str], list[str]]:
    objects = storage / "objects"
    names = {p.name for p in objects.iterdir() if not p.name.startswith(".")}
    tmp = objects / ".tmp"
    return names, sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []


@pytest.mark.root
def test_pull_end_to_end(
    tmp_path: Path, sandbox: Any, signing_dir: Path, registry: RegistryProcess
) -> None:
    base = {"hostos": HOSTOS, "steady": app(IDLE)}
    v1 = build_revision(tmp_path, signing_dir, 1, {**base, "web": app("echo web v1; " + IDLE)})
    v2 = build_revision(
        tmp_path, signing_dir, 2, {**base, "web": variant(tmp_path, "v2", "echo web v2; " + IDLE)}
    )
    stranger = tmp_path / "stranger"
    generate_key(stranger)
    v3 = build_revision(tmp_path, stranger, 3, {**base, "web": variant(tmp_path, "v3", IDLE)})
    v4 = build_revision(tmp_path, signing_dir, 4, {**base, "web": variant(tmp_path, "v4", IDLE)})
    v5 = build_revision(
        tmp_path, signing_dir, 5, {**base, "web": variant(tmp_path, "v5", "echo web v5; " + IDLE)}
    )

    device: SandboxDevice = sandbox(v1, *COMMIT)
    before = pids(device.wait_goals())
    tag = f"{registry.host}/fleet/demo:stable"

    def publish(rev: Path) -> None:
        pvpy("state", "publish", rev, tag, "--plain-http")

    def pull_once() -> subprocess.CompletedProcess[str]:
        return pvpy("device", "pull", "--storage", device.storage, "--run-dir", device.run_dir,
                    "--from", tag, "--plain-http", "--once", check=False, timeout=120)  # fmt: skip

    # an app-only update from the registry: only web restarts, UPDATED
    publish(v2)
    out = pull_once()
    assert out.returncode == 0 and "revision 2: UPDATED" in out.stdout, out.stdout + out.stderr
    now = pids(device.wait_goals())
    assert now["web"] != before["web"]
    assert (now["steady"], now["hostos"]) == (before["steady"], before["hostos"])
    assert device.status()["revision"] == 2
    good = records(device.storage)

    # the tag moved back to an older revision: nothing new, nothing recorded
    publish(v1)
    out = pull_once()
    assert out.returncode == 0 and "nothing new" in out.stdout, out.stdout + out.stderr
    assert records(device.storage) == good
    # ... and the same revision again is nothing new either
    publish(v2)
    assert "nothing new" in pull_once().stdout
    assert records(device.storage) == good

    # signed by a key the device does not trust: refused, however often it is polled; its
    # number is the registry's word, so no record under it, only the bounded refusals
    objects = stored_objects(device.storage)
    publish(v3)
    out = pull_once()
    assert out.returncode == 3 and "refused" in out.stdout, out.stdout + out.stderr
    assert "untrusted key" in out.stdout
    assert 3 not in records(device.storage)
    for _ in range(2):
        assert pull_once().returncode == 3
    refused = records(device.storage)
    assert 3 not in refused and refused == good
    refusals = json.loads((device.storage / "progress" / "refused.json").read_text())
    assert [r["claimed_revision"] for r in refusals] == [3, 3, 3]
    assert stored_objects(device.storage) == objects  # no object was fetched
    assert device.status()["revision"] == 2

    # a blob corrupted in the registry's storage: refused by its hash, nothing kept
    publish(v4)
    new_objects = {p.name for p in (v4 / "objects").iterdir()} - {
        p.name for p in (v2 / "objects").iterdir()
    }
    assert len(new_objects) == 1
    blob = registry.blob_file("sha256:" + new_objects.pop())
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    out = pull_once()
    assert out.returncode == 3 and "revision 4: failed" in out.stdout, out.stdout + out.stderr
    record = records(device.storage)[4]
    assert record["status"] == "WONTGO" and "hash to" in record["reason"], record
    assert stored_objects(device.storage) == objects
    assert not (device.storage / "trails" / "4").exists()
    assert device.status()["revision"] == 2 and pids(device.status()) == now

    # registry down: a polling puller says so and keeps trying; PID 1 does not notice
    registry.stop()
    log_path = tmp_path / "puller.log"
    with open(log_path, "wb") as log:
        puller = subprocess.Popen(
            [sys.executable, "-m", "pvpy", "device", "pull", "--storage", str(device.storage),
             "--run-dir", str(device.run_dir), "--from", tag, "--plain-http", "--interval", "0.5"],
            stdout=log, stderr=log)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while "cannot reach the registry" not in log_path.read_text():
            assert puller.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        time.sleep(2)  # a few more polls: said once, not once per poll
        assert log_path.read_text().count("cannot reach the registry") == 2  # log + stdout
        assert puller.poll() is None
        status = device.status()
        assert status["revision"] == 2 and pids(status) == now and status["updating"] is None
        # back up with a good revision: the same puller takes it
        registry.start()
        publish(v5)
        device.wait_for("revision 5", lambda s: s["revision"] == 5 and s["updating"] is None, 60)
        deadline = time.monotonic() + 30
        while "revision 5: UPDATED" not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        assert records(device.storage)[5]["status"] == "UPDATED"
        assert pids(device.wait_goals())["steady"] == before["steady"]
        # SIGTERM ends it cleanly
        puller.send_signal(signal.SIGTERM)
        assert puller.wait(10) == 0
    finally:
        if puller.poll() is None:
            puller.kill()
            puller.wait()
    assert 3 not in records(device.storage)

    # the device busy with an update (here a local one): the puller leaves it alone
    v6 = build_revision(
        tmp_path,
        signing_dir,
        6,
        {  # the same images: nothing to copy
            **base,
            "web": {**variant(tmp_path, "v5", "echo web v6; " + IDLE), "env": {"V": "6"}},
        },
    )
    publish(v6)
    pvpy("device", "update", v6, "--storage", device.storage, "--no-wait")
    out = pull_once()
    assert out.returncode == 10 and "busy" in out.stdout, out.stdout + out.stderr
    device.wait_for("revision 6", lambda s: s["revision"] == 6 and s["updating"] is None, 60)
    assert "nothing new" in pull_once().stdout


@pytest.mark.root
def test_device_configured_to_pull_updates_itself(
    tmp_path: Path, sandbox: Any, signing_dir: Path, registry: RegistryProcess
) -> None:
    """PID 1 keeps the puller running (--pull): publishing is all it takes."""
    base = {"hostos": HOSTOS, "steady": app(IDLE)}
    v1 = build_revision(tmp_path, signing_dir, 1, {**base, "web": app("echo web v1; " + IDLE)})
    v2 = build_revision(tmp_path, signing_dir, 2, {**base, "web": variant(tmp_path, "v2", IDLE)})
    tag = f"{registry.host}/fleet/self:stable"
    device: SandboxDevice = sandbox(
        v1, *COMMIT, "--pull", tag, "--pull-interval", "1", "--pull-plain-http"
    )
    before = pids(device.wait_goals())
    pvpy("state", "publish", v2, tag, "--plain-http")
    status = device.wait_for(
        "revision 2 pulled and committed",
        lambda s: s["revision"] == 2 and s["committed"] == 2 and s["all_goals_met"],
        timeout=90,
    )
    assert pids(status)["steady"] == before["steady"]
    assert records(device.storage)[2]["status"] == "UPDATED"
    assert any(
        e.get("event") == "helper started" and e.get("helper") == "registry puller"
        for e in device.events()
    )


# -- credentials and redirects (a small redirecting server, no registry needed) -----------


class _Seen:
    """What a test server was asked: (scheme, path, Authorization header)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str | None]] = []


def _serve(seen: _Seen, answer: Any, tls: Any = None) -> tuple[Any, int]:
    """A threaded HTTP server on 127.0.0.1; with ``tls`` (an SSLContext) it speaks TLS
    to clients that start a handshake and plain HTTP to the others, on the same port."""
    import http.server
    import socket
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            scheme = "https" if tls is not None and hasattr(self.connection, "cipher") else "http"
            seen.requests.append((scheme, self.path, self.headers.get("Authorization")))
            status, headers, body = answer(scheme, self.path, self.headers.get("Authorization"))
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def get_request(self) -> Any:
            sock, address = super().get_request()
            if tls is not None and sock.recv(1, socket.MSG_PEEK) == b"\x16":
                sock = tls.wrap_socket(sock, server_side=True)
            return sock, address

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def test_blob_redirects_to_another_host_carry_no_credentials() -> None:
    """A registry may send blobs from a CDN: followed, but the password stays home."""
    blob = b"blob bytes from the cdn"
    digest = reg.digest_of(blob)
    cdn_seen, registry_seen = _Seen(), _Seen()
    cdn, cdn_port = _serve(cdn_seen, lambda scheme, path, auth: (200, {}, blob))
    registry, port = _serve(registry_seen, lambda scheme, path, auth: (
        (401, {"WWW-Authenticate": 'Basic realm="registry"'}, b"") if auth is None else
        (307, {"Location": f"http://localhost:{cdn_port}/signed?x=1"}, b"")))  # fmt: skip
    try:
        client = Registry(f"127.0.0.1:{port}", plain_http=True, auth=("user", "secret"))
        assert client.read_blob("repo", digest, 1000) == blob
    finally:
        cdn.shutdown()
        registry.shutdown()
    # asked for them, the registry itself gets them
    assert [auth is not None for _, _, auth in registry_seen.requests] == [False, True]
    assert cdn_seen.requests == [("http", "/signed?x=1", None)]


def test_credentials_never_follow_a_redirect_from_https_to_http(tmp_path: Path) -> None:
    """https://registry redirecting to http:// on the same host and port: refused, and
    no request (let alone the password) goes out in clear text."""
    import ssl

    from tests.test_api import self_signed

    cert, key = self_signed(tmp_path / "tls")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    blob = b"blob"
    seen = _Seen()
    holder: dict[str, int] = {}
    server, port = _serve(seen, lambda scheme, path, auth: (
        (307, {"Location": f"http://127.0.0.1:{holder['port']}/plain"}, b"")
        if scheme == "https" else (200, {}, blob)), tls=context)  # fmt: skip
    holder["port"] = port
    try:
        client = Registry(f"127.0.0.1:{port}", cacert=str(cert), auth=("user", "secret"))
        with pytest.raises(RegistryError, match="https to http"):
            client.read_blob("repo", reg.digest_of(blob), 1000)
    finally:
        server.shutdown()
    assert [r[0] for r in seen.requests] == ["https"]
    assert all(auth is None for scheme, _, auth in seen.requests if scheme == "http")


def test_auth_file_errors_never_show_its_contents(tmp_path: Path) -> None:
    secret = tmp_path / "auth"
    for data in (b"-----BEGIN PRIVATE KEY-----\nMIIsecretkeybytes\n-----END PRIVATE KEY-----\n",
                 b"\x89secret\xff", b"user:pass\nuser2:secretpass2\n"):  # fmt: skip
        secret.write_bytes(data)
        secret.chmod(0o600)
        with pytest.raises(UsageError) as e:
            reg.load_auth(secret)
        assert str(secret) in str(e.value) and "secret" not in str(e.value).replace(str(secret), "")
    secret.write_bytes(b"user:pw\n")
    assert reg.load_auth(secret) == ("user", "pw")


def resign(rev: Path, keys: Path, fleet: str | None = None, keyset: Path | None = None) -> Path:
    """Name ``fleet`` in a built revision's state and sign it again (with ``keyset``)."""
    from pvpy.state import canonical

    doc = json.loads((rev / "state.json").read_bytes())
    if fleet is not None:
        doc["fleet"] = fleet
    (rev / "state.json").write_bytes(canonical.encode(doc))
    pvpy("state", "sign", rev, "--key", keys, *(["--keyset", keyset] if keyset else []))
    return rev


@pytest.mark.root
def test_key_rotation_and_fleet_binding_on_a_device(
    tmp_path: Path, sandbox: Any, signing_dir: Path, registry: RegistryProcess
) -> None:
    """A key rotation installed by a local update reaches the device's trust root:
    from then on a revision signed only by the rotated-out key is refused (WONTGO,
    exit 3) over a local update, an API push and a registry pull, while the
    revision installed before the rotation stays bootable (a rollback target). The
    same update binds the device to its fleet: another fleet's revision, signed by
    the same key, is refused over pull and local update; its own is taken."""
    base = {"hostos": HOSTOS, "steady": app(IDLE)}
    for name in ("old", "other", "ours"):
        (tmp_path / name).mkdir()
    new_keys = tmp_path / "new-keys"
    generate_key(new_keys)
    keyset = tmp_path / "keys.json"
    pvpy("key", "keyset", "--key", new_keys / "pvpy.pub", "--version", "1",
         "--sign", signing_dir, "--sign", new_keys, "--out", keyset)  # fmt: skip
    v1 = build_revision(tmp_path, signing_dir, 1, {**base, "web": app("echo web v1; " + IDLE)})
    v2 = resign(build_revision(tmp_path, new_keys, 2, {
        **base, "web": variant(tmp_path, "v2", "echo web v2; " + IDLE)}),
        new_keys, fleet="fleet/demo", keyset=keyset)  # fmt: skip
    old_key = resign(build_revision(tmp_path / "old", signing_dir, 3, {
        **base, "web": variant(tmp_path, "old", IDLE)}), signing_dir, fleet="fleet/demo")  # fmt: skip
    other = resign(build_revision(tmp_path / "other", new_keys, 3, {
        **base, "web": variant(tmp_path, "other", IDLE)}), new_keys, fleet="other/product")  # fmt: skip
    ours = resign(build_revision(tmp_path / "ours", new_keys, 3, {
        **base, "web": variant(tmp_path, "v3", "echo web v3; " + IDLE)}), new_keys,
        fleet="fleet/demo")  # fmt: skip

    port = free_port()
    device: SandboxDevice = sandbox(v1, *COMMIT, "--api-tcp", f"127.0.0.1:{port}")
    device.wait_goals()
    storage = device.storage
    tag = f"{registry.host}/fleet/demo:stable"

    def update(rev: Path) -> subprocess.CompletedProcess[str]:
        return pvpy("device", "update", rev, "--storage", storage, check=False, timeout=120)

    def pull(rev: Path) -> subprocess.CompletedProcess[str]:
        pvpy("state", "publish", rev, tag, "--plain-http")
        return pvpy("device", "pull", "--storage", storage, "--run-dir", device.run_dir,
                    "--from", tag, "--plain-http", "--once", check=False, timeout=120)  # fmt: skip

    # the rotation (and the fleet) arrive with revision 2
    out = update(v2)
    assert out.returncode == 0 and "UPDATED" in out.stdout, out.stdout + out.stderr
    trust_files = sorted(p.name for p in (storage / "trust").iterdir())
    assert trust_files == ["00-pvpy.pub", "fleet", "keys-v1-rev2.json", "time-floor"]
    assert (storage / "trust" / "keys-v1-rev2.json").read_bytes() == keyset.read_bytes()
    # revision 1, signed by the old key and installed before the rotation, still runs
    out = pvpy("device", "rollback", "--storage", storage, timeout=120)
    assert "rolling back" in out.stdout and "to revision 1" in out.stdout
    assert device.wait_goals()["revision"] == 1

    # signed only by the rotated-out key: refused everywhere, nothing installed
    out = update(old_key)
    assert out.returncode == 3 and "untrusted key" in out.stderr, out.stdout + out.stderr
    out = pvpy("device", "push", f"https://127.0.0.1:{port}", old_key, "--token-file",
               storage / "config" / "api-token", check=False, timeout=120)  # fmt: skip
    assert out.returncode == 3 and "untrusted key" in out.stderr, out.stdout + out.stderr
    out = pull(old_key)
    assert out.returncode == 3 and "refused" in out.stdout, out.stdout + out.stderr
    assert "untrusted key" in out.stdout
    # another fleet's revision, signed by the current key: refused over pull and update
    out = pull(other)
    assert out.returncode == 3 and "bound to fleet 'fleet/demo'" in out.stdout, out.stdout
    out = update(other)
    assert out.returncode == 3 and "bound to fleet 'fleet/demo'" in out.stderr, out.stderr
    assert not (storage / "trails" / "3").exists()
    assert device.status()["revision"] == 1

    # its own fleet, the new key: taken over pull; and it boots again after a reboot
    out = pull(ours)
    assert out.returncode == 0 and "revision 3: UPDATED" in out.stdout, out.stdout + out.stderr
    uptime = device.status()["uptime"]
    pvpy("device", "reboot", "--storage", storage)
    device.wait_for("the reboot", lambda s: s["uptime"] < uptime, 60)
    status = device.wait_goals(60)
    assert status["revision"] == 3 and status["committed"] == 3


# -- token auth (Debian's docker-registry, a small token server of ours) -------------------


class TokenServer:
    """The token spec's server: GET /token?service=&scope= with optional Basic auth.

    ``user``:``password`` get pull and push anywhere; anyone gets pull on ``public/*``.
    Tokens are RS256 JWTs whose x5c names a self-signed certificate the registry
    trusts (its ``rootcertbundle``). Logs (path, whether Basic auth came)."""

    def __init__(self, root: Path, user: str = "ci", password: str = "s3cret") -> None:
        import datetime as dt

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.user, self.password = user, password
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pvpy test token issuer")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip
        root.mkdir(parents=True, exist_ok=True)
        self.bundle = root / "token-ca.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.seen: list[tuple[str, bool]] = []
        self.server: Any = None
        self.port = 0

    def registry_config(self) -> str:
        return (
            "auth: {token: {"
            f"realm: 'http://127.0.0.1:{self.port}/token', service: pvpy-registry, "
            f"issuer: pvpy-tests, rootcertbundle: '{self.bundle}'}}}}\n"
        )

    def token(self, subject: str, access: list[dict[str, Any]]) -> str:
        import base64
        import os

        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        claims = {"iss": "pvpy-tests", "sub": subject, "aud": "pvpy-registry", "exp": now + 300,
                  "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(), "access": access}  # fmt: skip
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64(signature)}"

    def answer(self, path: str, authorization: str | None) -> tuple[int, bytes]:
        import base64
        from urllib.parse import parse_qs, urlsplit

        self.seen.append((path, authorization is not None))
        query = parse_qs(urlsplit(path).query)
        subject = "anonymous"
        if authorization is not None:
            scheme, _, value = authorization.partition(" ")
            given = base64.b64decode(value).decode() if scheme == "Basic" else ""
            if given != f"{self.user}:{self.password}":
                return 401, b'{"details": "wrong user or password"}'
            subject = self.user
        access = []
        for scope in query.get("scope", []):
            kind, name, actions = scope.split(":")
            allowed = actions.split(",") if subject == self.user else (
                ["pull"] if name.startswith("public/") and "pull" in actions else [])  # fmt: skip
            access.append({"type": kind, "name": name, "actions": allowed})
        return 200, json.dumps({"token": self.token(subject, access), "expires_in": 300}).encode()

    def start(self) -> TokenServer:
        self.server, self.port = _serve(_Seen(), lambda scheme, path, auth: self._reply(path, auth))
        return self

    def _reply(self, path: str, auth: str | None) -> tuple[int, dict[str, str], bytes]:
        status, body = self.answer(path, auth)
        return status, {"Content-Type": "application/json"}, body

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@pytest.fixture
def token_registry(tmp_path: Path) -> Iterator[tuple[RegistryProcess, TokenServer]]:
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry not installed (tools/setup installs it)")
    tokens = TokenServer(tmp_path / "tokens").start()
    server = RegistryProcess(tmp_path / "registry", auth=tokens.registry_config()).start()
    try:
        yield server, tokens
    finally:
        server.stop()
        tokens.stop()


def test_bearer_token_auth_for_publish_and_pull(
    tmp_path: Path, key: SigningKey, token_registry: tuple[RegistryProcess, TokenServer]
) -> None:
    """docker-registry with token auth: publish needs the credentials (they go to the
    token server, never to the registry); a public repository pulls anonymously, a
    private one only with them; a wrong password is a clear one-line error."""
    registry, tokens = token_registry
    rev = write_revision(tmp_path / "r1", 1, [key], {"app": b"app bytes " * 100})
    auth = tmp_path / "auth"
    auth.write_text(f"{tokens.user}:{tokens.password}\n")
    auth.chmod(0o600)
    for repo in ("public/demo", "fleet/private"):
        ref = reg.Reference.parse(f"{registry.host}/{repo}:stable")
        # anonymous: the token server grants no push
        with pytest.raises(RegistryError, match="401"):
            pub.publish(Registry(registry.host, plain_http=True), ref, rev, say=lambda s: None)
        client = Registry(registry.host, plain_http=True, auth=reg.load_auth(auth))
        result = pub.publish(client, ref, rev, say=lambda s: None)
        assert result.sent_blobs == 4
    assert all(with_auth for path, with_auth in tokens.seen[-2:])
    # one token per scope, not one per request
    assert len(tokens.seen) < 10, tokens.seen

    # public: no credentials needed; the blob verified
    anonymous = Registry(registry.host, plain_http=True)
    data, digest = anonymous.get_manifest("public/demo", "stable")
    state = json.loads(data)["layers"][0]["digest"]
    assert anonymous.read_blob("public/demo", state, 1 << 20) == (rev / "state.json").read_bytes()
    assert not tokens.seen[-1][1]  # asked anonymously
    # private: refused without credentials, served with them
    with pytest.raises(RegistryError, match="401"):
        anonymous.get_manifest("fleet/private", "stable")
    client = Registry(registry.host, plain_http=True, auth=reg.load_auth(auth))
    assert client.get_manifest("fleet/private", "stable")[1] == digest
    # a wrong password: the token server says no, in one line
    wrong = Registry(registry.host, plain_http=True, auth=("ci", "wrong"))
    with pytest.raises(RegistryError, match=r"token from .*: 401") as e:
        wrong.get_manifest("fleet/private", "stable")
    assert "wrong" not in str(e.value).replace("wrong user", "")
    # the CLI: --auth-file for publish, exit 11 without
    out = pvpy("state", "publish", rev, f"{registry.host}/fleet/cli:stable", "--plain-http",
               "--auth-file", auth)  # fmt: skip
    assert "sent 4 blob(s)" in out.stdout
    out = pvpy("state", "publish", rev, f"{registry.host}/fleet/cli2:stable", "--plain-http",
               check=False)  # fmt: skip
    assert out.returncode == 11 and "401" in out.stderr, out.stderr


def test_bearer_tokens_stay_home(tmp_path: Path) -> None:
    """A token (like a password) goes to the registry only: a blob redirected to a CDN
    goes without it; a realm over plain http for an https registry is refused."""
    blob = b"blob bytes from the cdn"
    digest = reg.digest_of(blob)
    cdn_seen, registry_seen, token_seen = _Seen(), _Seen(), _Seen()
    cdn, cdn_port = _serve(cdn_seen, lambda scheme, path, auth: (200, {}, blob))
    token, token_port = _serve(token_seen, lambda scheme, path, auth: (
        200, {}, b'{"token": "t0k3n", "expires_in": 60}'))  # fmt: skip
    realm = f'Bearer realm="http://127.0.0.1:{token_port}/token",service="reg",scope="x"'
    registry, port = _serve(registry_seen, lambda scheme, path, auth: (
        (401, {"WWW-Authenticate": realm}, b"") if auth != "Bearer t0k3n" else
        (307, {"Location": f"http://localhost:{cdn_port}/signed?x=1"}, b"")))  # fmt: skip
    try:
        client = Registry(f"127.0.0.1:{port}", plain_http=True, auth=("user", "secret"))
        assert client.read_blob("repo", digest, 1000) == blob
    finally:
        for server in (cdn, token, registry):
            server.shutdown()
    assert [auth for _, _, auth in registry_seen.requests] == [None, "Bearer t0k3n"]
    assert token_seen.requests[0][1] == "/token?service=reg&scope=x"
    assert token_seen.requests[0][2] is not None  # same host as a plain-http registry
    assert cdn_seen.requests == [("http", "/signed?x=1", None)]
    # https registry, http realm: refused before anything is sent there
    import ssl

    from tests.test_api import self_signed

    cert, keyfile = self_signed(tmp_path / "tls")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, keyfile)
    token_seen.requests.clear()
    token, token_port = _serve(token_seen, lambda scheme, path, auth: (200, {}, b"{}"))
    realm = f'Bearer realm="http://127.0.0.1:{token_port}/token",service="reg"'
    tls_seen = _Seen()
    server, port = _serve(tls_seen, lambda scheme, path, auth: (
        401, {"WWW-Authenticate": realm}, b""), tls=context)  # fmt: skip
    try:
        client = Registry(f"127.0.0.1:{port}", cacert=str(cert), auth=("user", "secret"))
        with pytest.raises(RegistryError, match="token realm over plain http"):
            client.read_blob("repo", digest, 1000)
    finally:
        server.shutdown()
        token.shutdown()
    assert token_seen.requests == []


@pytest.mark.root
def test_device_pulls_from_a_token_auth_registry(
    tmp_path: Path, sandbox: Any, signing_dir: Path,
    token_registry: tuple[RegistryProcess, TokenServer],
) -> None:  # fmt: skip
    """`pvpy device pull` with STORAGE/config/registry-auth (0600) from a private
    repository; from a public one with no credentials at all."""
    registry, tokens = token_registry
    base = {"hostos": HOSTOS, "steady": app(IDLE)}
    v1 = build_revision(tmp_path, signing_dir, 1, {**base, "web": app("echo web v1; " + IDLE)})
    v2 = build_revision(tmp_path, signing_dir, 2, {**base, "web": variant(tmp_path, "v2", IDLE)})
    v3 = build_revision(tmp_path, signing_dir, 3, {**base, "web": variant(tmp_path, "v3", IDLE)})
    auth = tmp_path / "ci-auth"
    auth.write_text(f"{tokens.user}:{tokens.password}\n")
    auth.chmod(0o600)
    private, public = f"{registry.host}/fleet/private:stable", f"{registry.host}/public/demo:stable"
    pvpy("state", "publish", v2, private, "--plain-http", "--auth-file", auth)
    pvpy("state", "publish", v3, public, "--plain-http", "--auth-file", auth)
    device: SandboxDevice = sandbox(v1, *COMMIT)
    device.wait_goals()

    def pull(tag: str) -> subprocess.CompletedProcess[str]:
        return pvpy("device", "pull", "--storage", device.storage, "--run-dir", device.run_dir,
                    "--from", tag, "--plain-http", "--once", check=False, timeout=120)  # fmt: skip

    out = pull(private)
    assert out.returncode == 10 and "401" in out.stdout, out.stdout + out.stderr
    device_auth = device.storage / "config" / "registry-auth"
    device_auth.write_text(f"{tokens.user}:{tokens.password}\n")
    device_auth.chmod(0o600)
    before = len(tokens.seen)
    out = pull(private)
    assert out.returncode == 0 and "revision 2: UPDATED" in out.stdout, out.stdout + out.stderr
    assert tokens.seen[before:] and all(with_auth for _, with_auth in tokens.seen[before:])
    device_auth.unlink()
    before = len(tokens.seen)
    out = pull(public)
    assert out.returncode == 0 and "revision 3: UPDATED" in out.stdout, out.stdout + out.stderr
    assert tokens.seen[before:] and not any(with_auth for _, with_auth in tokens.seen[before:])
    assert device.status()["revision"] == 3
