"""The device API (pvpy.device.api) and the workstation client (pvpy.workstation.remote, `pvpy device push`).

The root tests boot a real sandbox device and talk to a real `pvpy device api`
process over TCP: either the one PID 1 starts (`--api-tcp`), or one started here
with small limits against the device's run dir (so its control socket is PID 1's).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import secrets
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pvpy.device import api
from pvpy.device import update as up
from pvpy.errors import (
    ApiError,
    CommandError,
    DeviceError,
    ManifestError,
    ObjectCorruptError,
    ObjectNameError,
    RemoteError,
    RollbackError,
    SignatureError,
    StoreError,
    UsageError,
    exit_code,
    http_status,
)
from pvpy.workstation.remote import Device
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

REPO = Path(__file__).resolve().parent.parent
OPENAPI = REPO / "docs" / "openapi.yaml"


# -- helpers ----------------------------------------------------------------------------


def provision_token(storage: Path) -> str:
    token = secrets.token_urlsafe(32)
    path = storage / "config" / "api-token"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


def credentials_file(storage: Path, token: str, out: Path) -> Path:
    """What a workstation is given for a device: its token and its certificate's pin."""
    from pvpy.api_credentials import ApiCredentials, certificate_sha256

    pin = certificate_sha256((storage / "config" / "api-cert.pem").read_bytes())
    out.write_bytes(ApiCredentials(token, pin).render())
    out.chmod(0o600)
    return out


def tls_client_context() -> ssl.SSLContext:
    """TLS that trusts any certificate: these tests are about HTTP (pinning has its own)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Client:
    """Raw HTTPS to the API, TLS by default as the device serves it (http.client never
    normalizes a path: "../" goes as sent)."""

    def __init__(self, port: int, token: str | None) -> None:
        self.port = port
        self.token = token

    def request(
        self, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None, token: str | None = "default", timeout: float = 30,
    ) -> tuple[int, Any]:  # fmt: skip
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout,
                                           context=tls_client_context())  # fmt: skip
        hdrs = dict(headers or {})
        bearer = self.token if token == "default" else token
        if bearer is not None:
            hdrs["Authorization"] = f"Bearer {bearer}"
        try:
            conn.request(method, path, body=body, headers=hdrs)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        if response.getheader("Content-Type", "").startswith("application/json") and data:
            return response.status, json.loads(data)
        return response.status, data

    def json(self, method: str, path: str, doc: Any, **kw: Any) -> tuple[int, Any]:
        return self.request(method, path, json.dumps(doc).encode(),
                            {"Content-Type": "application/json"}, **kw)  # fmt: skip


def wait_api(client: Client, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.request("GET", "/v1/revisions", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("the API did not come up")
        time.sleep(0.2)


@contextlib.contextmanager
def api_process(
    storage: Path, run_dir: Path, port: int, *extra: str
) -> Iterator[subprocess.Popen[bytes]]:
    """`pvpy device api` run by the test (not by PID 1), SIGTERM at the end."""
    log = open(storage.parent / f"api-{port}.log", "ab")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvpy", "device", "api", "--storage", str(storage),
         "--run-dir", str(run_dir), "--tcp", f"127.0.0.1:{port}", *extra],
        stdout=log, stderr=log,
    )  # fmt: skip
    log.close()
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def objects_on(storage: Path) -> tuple[set[str], list[str]]:
    objects = storage / "objects"
    names = {p.name for p in objects.iterdir() if not p.name.startswith(".")}
    return names, sorted(p.name for p in (objects / ".tmp").iterdir())


def pids(status: dict[str, Any]) -> dict[str, int]:
    return {c["name"]: c["pid"] for c in status["containers"]}


def sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


# -- without a device --------------------------------------------------------------------


def test_errors_map_to_statuses_in_one_place() -> None:
    assert http_status(ObjectNameError("x")) == (400, "store")
    assert http_status(ObjectCorruptError("x")) == (422, "store")
    assert http_status(RollbackError("x")) == (409, "trust")
    assert http_status(SignatureError("x")) == (403, "trust")
    assert http_status(ManifestError("x")) == (422, "manifest")
    assert http_status(StoreError("x")) == (500, "store")
    assert http_status(UsageError("x")) == (400, "usage")
    assert http_status(ApiError(401, "no", kind="auth")) == (401, "auth")
    assert http_status(KeyError("bug")) == (500, "internal")


def test_a_device_refusal_exits_as_the_same_refusal_would_locally() -> None:
    """The client maps the API's kind back through the same table (errors.ERRORS)."""
    for local, status in ((StoreError("x"), 500), (RollbackError("x"), 409),
                          (ManifestError("x"), 422), (UsageError("x"), 400),
                          (DeviceError("x"), 409)):  # fmt: skip
        kind = http_status(local)[1]
        assert RemoteError("x", status, kind).exit_code == local.exit_code
    assert CommandError(["crun"], 1).exit_code == 7 and exit_code(KeyError("bug")) == 70
    assert RemoteError("no answer").exit_code == 10  # unreachable: the device's doing
    assert RemoteError("x", 401, "auth").exit_code == 10
    assert RemoteError("x", 400, "http").exit_code == 1
    assert RemoteError("refused", 422, "store", refused=True).exit_code == 3


def test_posted_files_as_text_or_base64() -> None:
    raw = b'{"a":"\xc3\xa9"}'
    body = {"state": raw.decode(), "signature": {"base64": base64.b64encode(b"sig").decode()}}
    assert api.parse_revision_body(body, 100) == (raw, b"sig", None)
    for bad, status in (({"state": "x", "signature": 1}, 400),
                        ({"state": "x", "signature": "y", "extra": 1}, 400),
                        ({"state": "\ud800", "signature": "y"}, 400),
                        ({"state": {"base64": "!!"}, "signature": "y"}, 400),
                        ({"state": "x" * 101, "signature": "y"}, 413)):  # fmt: skip
        with pytest.raises(ApiError) as e:
            api.parse_revision_body(bad, 100)
        assert e.value.status == status


def test_device_urls() -> None:
    assert Device("unix:/run/pvpy/api.sock").unix_path == "/run/pvpy/api.sock"
    d = Device("http://10.0.0.2:8080")
    assert (d.host, d.port, d.unix_path) == ("10.0.0.2", 8080, None)
    for bad in ("ftp://x", "http://", "unix:", "10.0.0.2:80"):
        with pytest.raises(UsageError):
            Device(bad)
    assert api.parse_hostport("[::1]:80") == ("::1", 80)
    with pytest.raises(UsageError):
        api.parse_hostport("host:²")


def test_uploads_and_tokens_without_pid1(tmp_path: Path) -> None:
    """The storage half of the API needs no PID 1: objects, revisions, tokens, names."""
    storage, run_dir, port = tmp_path / "storage", tmp_path / "run", free_port()
    token = provision_token(storage)
    client = Client(port, token)
    with api_process(storage, run_dir, port, "--max-object", "1000"):
        wait_api(client)
        assert stat.S_IMODE(os.stat(run_dir / "api.sock").st_mode) == 0o600
        good = b"object bytes"
        # no or a wrong token: 401 and nothing stored
        for bad in (None, "wrong-token-wrong-token", token + "x", ""):
            assert client.request("PUT", f"/v1/objects/{sha(good)}", good, token=bad)[0] == 401
        assert client.request("GET", "/v1/nothing", token=None)[0] == 401  # no route probing
        assert not (storage / "objects").exists() or objects_on(storage) == (set(), [])
        # stored once, then idempotent
        status, doc = client.request("PUT", f"/v1/objects/{sha(good)}", good)
        assert (status, doc["created"]) == (201, True)
        status, doc = client.request("PUT", f"/v1/objects/{sha(good)}", good)
        assert (status, doc["created"]) == (200, False)
        assert client.request("HEAD", f"/v1/objects/{sha(good)}")[0] == 200
        assert client.request("HEAD", f"/v1/objects/{sha(b'other')}")[0] == 404
        # bytes that do not hash to the name: refused, nothing stored, no temp file left
        status, doc = client.request("PUT", f"/v1/objects/{sha(b'claimed')}", b"different")
        assert status == 422 and "hash to" in doc["error"]
        assert objects_on(storage) == ({sha(good)}, [])
        # over --max-object (no pending state names it), and no Content-Length
        assert client.request("PUT", f"/v1/objects/{sha(b'x' * 2000)}", b"x" * 2000)[0] == 413
        assert raw_exchange(port, token, f"PUT /v1/objects/{sha(b'y')} HTTP/1.1\r\n"
                            "Host: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\ny\r\n0\r\n\r\n"
                            ).startswith(b"HTTP/1.1 411")  # fmt: skip
        status, doc = client.json(
            "POST", "/v1/objects/missing", {"objects": [sha(good), sha(b"z")]}
        )
        assert (status, doc) == (200, {"missing": [sha(b"z")]})
        # the token file must be private: readable by others, nobody gets in
        (storage / "config" / "api-token").chmod(0o644)
        assert client.request("GET", "/v1/revisions")[0] == 401
        (storage / "config" / "api-token").chmod(0o600)
        assert client.request("GET", "/v1/revisions")[0] == 200
        # no PID 1: what needs it says so, 503
        status, doc = client.request("GET", "/v1/status")
        assert status == 503 and "PID 1" in doc["error"]
        # the unix socket needs no token (its mode is the guard)
        out = pvpy("device", "status", f"unix:{run_dir / 'api.sock'}", check=False)
        assert out.returncode == 10 and "PID 1 does not answer" in out.stderr
    assert not (run_dir / "api.sock").exists()


def self_signed(out: Path) -> tuple[Path, Path]:
    """A device certificate for 127.0.0.1 (what a board would be provisioned with)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pvpy device")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "api-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "api-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (out / "api-key.pem").chmod(0o600)
    return out / "api-cert.pem", out / "api-key.pem"


def test_tls_with_a_device_certificate(tmp_path: Path) -> None:
    """config/api-cert.pem + api-key.pem in the storage: TCP speaks TLS (no option needed)."""
    import ssl

    storage, run_dir, port = tmp_path / "storage", tmp_path / "run", free_port()
    token = provision_token(storage)
    cert, _ = self_signed(storage / "config")
    storage.joinpath("logs").mkdir()
    storage.joinpath("logs", "web.log").write_text("hello over tls\n")
    url = f"https://127.0.0.1:{port}"
    with api_process(storage, run_dir, port):
        context = ssl.create_default_context(cafile=str(cert))
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
                conn.request("GET", "/v1/revisions", headers={"Authorization": f"Bearer {token}"})
                assert conn.getresponse().status == 200
                break
            except OSError:
                assert time.monotonic() < deadline, "no TLS listener"
                time.sleep(0.2)
        out = pvpy("device", "logs", url, "web", "--token", token, "--cacert", cert)
        assert out.stdout == "hello over tls\n"
        # the device is only trusted through its certificate
        out = pvpy("device", "logs", url, "web", "--token", token, check=False)
        assert out.returncode == 10 and "CERTIFICATE_VERIFY_FAILED" in out.stderr
        # the credentials file alone: token, and the certificate pinned by its sha256
        creds = credentials_file(storage, token, tmp_path / "device-creds")
        assert (
            pvpy("device", "logs", url, "web", "--token-file", creds).stdout == "hello over tls\n"
        )
        # another certificate than the pinned one: refused in one line, no token sent
        from pvpy.api_credentials import ApiCredentials

        wrong = tmp_path / "wrong-pin"
        wrong.write_bytes(ApiCredentials(token, "0" * 64).render())
        out = pvpy("device", "logs", url, "web", "--token-file", wrong, check=False)
        assert out.returncode == 10 and "is not the pinned" in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
        # plain HTTP to the TLS port: told so, in plain HTTP (--token: nothing pinned)
        out = pvpy("device", "logs", f"http://127.0.0.1:{port}", "--token", token, check=False)
        assert out.returncode == 2 and "this port speaks TLS: use https://" in out.stderr
        # with a pin in the token file the client does not even try plain HTTP
        out = pvpy("device", "logs", f"http://127.0.0.1:{port}", "--token-file", creds,
                   check=False)  # fmt: skip
        assert out.returncode == 2 and f"use https://127.0.0.1:{port}" in out.stderr


def raw_exchange(port: int, token: str | None, text: str, timeout: float = 10) -> bytes:
    """Send raw bytes (an Authorization header is added); return the raw answer."""
    head, _, rest = text.partition("\r\n")
    if token is not None:
        head += f"\r\nAuthorization: Bearer {token}"
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    with tls_client_context().wrap_socket(raw) as s:
        s.sendall((head + "\r\n" + rest).encode())
        data = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                data += chunk
                if b"\r\n\r\n" in data:
                    break
    return data


def test_ambiguous_lengths_close_and_names_match_in_full(tmp_path: Path) -> None:
    """Two Content-Length headers: 400 and the connection closed (the next request would
    start where one of them says: smuggling). A trailing newline makes no valid name."""
    storage, run_dir, port = tmp_path / "storage", tmp_path / "run", free_port()
    token = provision_token(storage)
    client = Client(port, token)
    with api_process(storage, run_dir, port):
        wait_api(client)
        for method, lengths in (("GET", ("1", "5")), ("PUT", ("1", "1")), ("POST", ("1", " 1x"))):
            path = f"/v1/objects/{sha(b'x')}" if method == "PUT" else "/v1/revisions"
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            with tls_client_context().wrap_socket(raw) as s:
                s.sendall(
                    f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}"
                    f"\r\nContent-Length: {lengths[0]}\r\nContent-Length: {lengths[1]}"
                    "\r\n\r\nxGET /v1/revisions HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                )
                data = b""
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    while chunk := s.recv(65536):  # ends only when the server closes
                        data += chunk
            assert data.startswith(b"HTTP/1.1 400") and b"Connection: close" in data, data
            assert data.count(b"HTTP/1.1") == 1, data
        assert client.request("GET", "/v1/logs?tail=5%0A")[0] == 400
        assert client.request("GET", "/v1/logs?tail=5")[0] == 200
        assert client.request("GET", "/v1/revisions/1%0A")[0] == 400


@contextlib.contextmanager
def slowloris(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections that send a request head a few bytes at a time, never
    finishing it (half plain bytes, half inside a TLS session), until the block ends."""
    socks: list[socket.socket] = []
    stop = threading.Event()
    try:
        for i in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if i % 2:
                with contextlib.suppress(OSError):
                    s = tls_client_context().wrap_socket(s)
            socks.append(s)

        def drip() -> None:
            line = b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Pad: "
            for n in range(10_000):
                for i, s in enumerate(socks):
                    if i % 4 == 0:  # these only connect
                        continue
                    with contextlib.suppress(OSError, ValueError):
                        s.send(line[n : n + 1] if n < len(line) else b"a")
                if stop.wait(0.2):
                    return

        threading.Thread(target=drip, daemon=True).start()
        time.sleep(0.5)
        yield socks
    finally:
        stop.set()
        for s in socks:
            s.close()


def keep_alive(port: int, token: str) -> socket.socket:
    """A connection that made one request with the token and then idles (kept alive)."""
    s = tls_client_context().wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5))
    s.sendall(f"GET /v1/revisions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
              .encode())  # fmt: skip
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        data += s.recv(4096)
    return s


def test_slowloris_on_tcp_locks_out_neither_tcp_clients_nor_the_unix_socket(
    tmp_path: Path,
) -> None:
    """Unauthenticated peers wait in a gate of their own: 100 sockets dripping request
    heads hold none of the 4 slots; a client with the token gets in at once, the
    unix socket is served, and the drippers are cut after the short auth deadline."""
    storage, run_dir, port = tmp_path / "storage", tmp_path / "run", free_port()
    token = provision_token(storage)
    client = Client(port, token)
    with api_process(storage, run_dir, port, "--max-connections", "4"):
        wait_api(client)
        with slowloris(port, 100) as socks:
            for _ in range(3):
                started = time.monotonic()
                assert client.request("GET", "/v1/revisions", timeout=5)[0] == 200
                assert time.monotonic() - started < 3
            started = time.monotonic()
            local = Device(f"unix:{run_dir / 'api.sock'}").call("GET", "/v1/revisions")
            assert local["revisions"] == [] and time.monotonic() - started < 3
            time.sleep(6.5)  # Limits.auth_timeout (5 s) and the gate's half-second round
            cut = 0
            for s in socks:  # plain ones were told "this port speaks TLS" (400) and closed
                s.settimeout(0.5)
                with contextlib.suppress(TimeoutError):
                    try:
                        while s.recv(4096):
                            pass
                    except (ssl.SSLError, ConnectionError):
                        pass
                    cut += 1
            assert cut == len(socks)


# -- with a sandbox device ---------------------------------------------------------------


def factory(tmp_path: Path, keys: Path) -> Path:
    return build_revision(tmp_path, keys, 1, {
        "hostos": HOSTOS, "steady": app(IDLE), "web": app("echo web v1; " + IDLE)})  # fmt: skip


@pytest.mark.root
def test_bad_input_and_floods_leave_pid1_alone(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    device: SandboxDevice = sandbox(factory(tmp_path, signing_dir))
    before = device.wait_goals()
    token, port = provision_token(device.storage), free_port()
    client = Client(port, token)
    with api_process(device.storage, device.run_dir, port, "--max-connections", "8",
                     "--head-timeout", "2", "--max-object", "1048576"):  # fmt: skip
        wait_api(client)
        assert client.request("GET", "/v1/status")[1]["revision"] == 1
        objects = objects_on(device.storage)

        # no or a wrong token: 401, and nothing happens
        for bad in (None, "not-the-token-at-all"):
            assert client.request("POST", "/v1/commands/poweroff", token=bad)[0] == 401
            assert client.request("POST", "/v1/containers/web/restart", token=bad)[0] == 401
            assert client.json("POST", "/v1/revisions", {"state": "x", "signature": "y"},
                               token=bad)[0] == 401  # fmt: skip
            assert client.request("PUT", f"/v1/objects/{sha(b'a')}", b"a", token=bad)[0] == 401

        # path traversal: refused before touching the filesystem
        for path in (
            "/v1/objects/..%2F..%2Fetc%2Fpasswd",
            "/v1/objects/../../etc/passwd",
            f"/v1/objects/{sha(b'a').upper()}",
            "/v1/objects/" + "a" * 63,
            "/v1/logs/..%2F..%2Fetc%2Fpasswd",
            "/v1/logs/../../../etc/passwd",
            "/v1/logs/.hidden",
            "/v1/revisions/..",
            "/v1/containers/..%2Fx/restart",
        ):
            for method in ("GET", "HEAD", "PUT"):
                status, doc = client.request(method, path, b"a" if method == "PUT" else None)
                assert status in (400, 404, 405), (method, path, status)
                assert b"root:" not in (doc if isinstance(doc, bytes) else json.dumps(doc).encode())

        # an object whose bytes are not its name: refused, nothing stored
        status, doc = client.request("PUT", f"/v1/objects/{sha(b'one')}", b"two")
        assert status == 422
        # malformed and oversized bodies: 4xx with a one-line reason
        bad_bodies = [
            b"{",
            b"[]",
            b"null",
            b'{"state": 1, "signature": "x"}',
            b'{"x": 1}',
            b"[" * 100_000 + b"]" * 100_000,
            b'{"state": "\\ud800", "signature": "x"}',
            json.dumps({"state": json.dumps({"revision": 77}), "signature": "[]"}).encode(),
        ]
        for body in bad_bodies:
            for path in ("/v1/revisions", "/v1/objects/missing"):
                status, doc = client.request(
                    "POST", path, body, {"Content-Type": "application/json"}
                )
                assert 400 <= status < 500 and "\n" not in doc["error"], (path, body[:40], doc)
        huge = json.dumps({"state": "x" * (17 << 20), "signature": "y"}).encode()
        assert client.request("POST", "/v1/revisions", huge)[0] == 413
        assert raw_exchange(
            port,
            token,
            f"POST /v1/revisions HTTP/1.1\r\nHost: x\r\nContent-Length: {1 << 40}\r\n\r\n",
        ).startswith(b"HTTP/1.1 413")
        assert raw_exchange(port, token, "POST /v1/revisions HTTP/1.1\r\nHost: x\r\n\r\n"
                            ).startswith(b"HTTP/1.1 411")  # fmt: skip
        assert raw_exchange(
            port,
            token,
            f"PUT /v1/objects/{sha(b'big')} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {2 << 20}\r\n\r\n",
        ).startswith(b"HTTP/1.1 413")
        assert raw_exchange(port, token, "GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")
        assert objects_on(device.storage) == objects
        # a state that parses but is not signed: refused, and no record under the number
        # it claims (unverified input must not grow the records: only the last refusals)
        assert client.request("GET", "/v1/revisions/77")[0] == 404
        assert up.last_refusals(device.storage)

        # 100 slowloris sockets (connect, drip a request head, never finish) hold no
        # slot: a client with the token is served at once, PID 1 does not notice
        with slowloris(port, 100):
            started = time.monotonic()
            assert client.request("GET", "/v1/status", timeout=5)[0] == 200
            assert time.monotonic() - started < 3
            assert device.status()["revision"] == 1
        # slots are for clients with the token: 8 idle keep-alive connections fill the
        # listener, the next gets 503 at once, the idle ones are cut after --head-timeout
        idle = [keep_alive(port, token) for _ in range(8)]
        try:
            time.sleep(0.3)
            started = time.monotonic()
            assert client.request("GET", "/v1/revisions", timeout=5)[0] == 503
            assert time.monotonic() - started < 2
            for s in idle:
                s.settimeout(6)
                assert s.recv(100) == b""  # closed by the server
        finally:
            for s in idle:
                s.close()
        time.sleep(0.5)
        assert client.request("GET", "/v1/revisions")[0] == 200

        # 50 clients at once: each is served or refused with a 503, quickly
        results: list[int | str] = []

        def one() -> None:
            try:
                results.append(client.request("GET", "/v1/status", timeout=20)[0])
            except Exception as e:
                results.append(repr(e))

        started = time.monotonic()
        threads = [threading.Thread(target=one) for _ in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert time.monotonic() - started < 30
        assert len(results) == 50 and set(results) <= {200, 503}, results
        assert results.count(200) >= 8

        # PID 1 is unaffected: same revision, same container processes, no shutdown
        after = device.status()
        assert after["revision"] == 1 and after["pending"] is None
        assert pids(after) == pids(before)
        assert client.request("GET", "/v1/status")[0] == 200


@pytest.mark.root
def test_push_over_tcp_end_to_end(tmp_path: Path, sandbox: Any, signing_dir: Path) -> None:
    base = {"hostos": HOSTOS, "steady": app(IDLE)}
    v1 = factory(tmp_path, signing_dir)
    v2 = build_revision(
        tmp_path, signing_dir, 2, {**base, "web": variant(tmp_path, "v2", "echo web v2; " + IDLE)}
    )
    v3 = build_revision(
        tmp_path,
        signing_dir,
        3,
        {  # the same images: nothing to send
            **base,
            "web": variant(tmp_path, "v2", "echo web v3; " + IDLE, env={"V": "3"}),
        },
    )
    crash = build_revision(
        tmp_path,
        signing_dir,
        4,
        {
            **base,
            "web": variant(
                tmp_path,
                "crash",
                "exit 1",
                restart={"policy": "always", "backoff_initial_ms": "100ms"},
            ),
        },
    )

    port = free_port()
    device: SandboxDevice = sandbox(v1, *COMMIT, "--api-tcp", f"127.0.0.1:{port}")
    token = provision_token(device.storage)  # read by the API when it changes: no restart
    wait_api(Client(port, token))  # the API made its certificate at start (none provisioned)
    token_file = credentials_file(device.storage, token, tmp_path / "token")
    cert = device.storage / "config" / "api-cert.pem"
    url = f"https://127.0.0.1:{port}"
    before = pids(device.wait_goals())
    wait_api(Client(port, token))

    # an app update: only web restarts; the objects go once
    out = pvpy("device", "push", url, v2, "--token-file", token_file, timeout=120)
    assert "revision 2: UPDATED" in out.stdout, out.stdout
    assert "1 missing" in out.stdout and "sent 1 object(s)" in out.stdout
    now = pids(device.wait_goals())
    assert now["web"] != before["web"] and now["steady"] == before["steady"]
    assert now["hostos"] == before["hostos"]

    # the same images again: nothing is sent
    out = pvpy("device", "push", url, v3, "--token", token, "--cacert", cert, timeout=120)
    assert "0 missing (0 B)" in out.stdout and "sent 0 object(s), 0 B" in out.stdout
    assert "revision 3: UPDATED" in out.stdout
    good = pids(device.wait_goals())

    # a crash-looping app: rolled back, ERROR, exit 3; the others keep running
    out = pvpy("device", "push", url, crash, "--token-file", token_file, check=False, timeout=120)
    assert out.returncode == 3 and "revision 4: ERROR rolled back" in out.stdout, (
        out.stdout + out.stderr
    )
    back = device.wait_for("3 back", lambda s: s["updating"] is None and s["all_goals_met"])
    assert back["revision"] == 3 and back["committed"] == 3
    assert pids(back)["steady"] == good["steady"]

    # an older revision: refused (WONTGO), exit 3, no upload, nothing changes
    out = pvpy("device", "push", url, v1, "--token-file", token_file, check=False)
    assert out.returncode == 3 and "not newer" in out.stderr and "missing" not in out.stdout
    assert "device refused revision 1" in out.stderr, out.stderr
    assert device.status()["revision"] == 3
    # without the token: refused, exit 10
    out = pvpy("device", "push", url, v2, "--cacert", cert, check=False)
    assert out.returncode == 10 and "401" in out.stderr

    # status and logs, over TCP and over the unix socket (no token there)
    out = pvpy("device", "status", url, "--token-file", token_file)
    assert "running    3" in out.stdout and "steady" in out.stdout and "UPDATED" in out.stdout
    assert "running    3" in pvpy("device", "status", f"unix:{device.run_dir / 'api.sock'}").stdout
    assert "web v3" in pvpy("device", "logs", url, "web", "--token-file", token_file).stdout
    # with the times each line was written, and a window: served by the API, not the client
    timed = pvpy("device", "logs", url, "web", "-t", "--token-file", token_file).stdout
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\S* web v3$", timed, re.M), timed
    after = pvpy("device", "logs", url, "web", "--since", "2099-01-01T00:00:00",
                 "--token-file", token_file).stdout  # fmt: skip
    assert "web v3" not in after
    assert "web| web v3" in pvpy("device", "logs", url, "--token-file", token_file,
                                 "-n", "5").stdout  # fmt: skip
    follower = subprocess.Popen(
        [sys.executable, "-m", "pvpy", "device", "logs", url, "web", "-f", "-n", "0",
         "--token-file", token_file],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        time.sleep(1)
        Client(port, token).request("POST", "/v1/containers/web/restart")
        line = b""
        deadline = time.monotonic() + 20
        assert follower.stdout is not None
        os.set_blocking(follower.stdout.fileno(), False)
        while b"web v3" not in line and time.monotonic() < deadline:
            line += follower.stdout.read() or b""
            time.sleep(0.1)
        assert b"web v3" in line
    finally:
        follower.kill()
        follower.wait()
    device.wait_goals()
    states = {r["revision"]: r["status"] for r in
              Client(port, token).request("GET", "/v1/revisions")[1]["revisions"]}  # fmt: skip
    # 1 (the factory revision, no record) stays: the containers 2 and 3 did not change
    # still run on its writable layers, so GC keeps its trail; its refused replay left
    # no WONTGO over it (a replay must not mark an installed revision refused)
    assert states == {1: None, 2: "UPDATED", 3: "UPDATED", 4: "ERROR"}

    # power off over TCP: the reply arrives (PID 1 stops the API process at once,
    # the API lets the reply out first), then the sandbox ends by itself
    assert Client(port, token).request("POST", "/v1/commands/poweroff") == (
        202, {"command": "poweroff"})  # fmt: skip
    assert device.proc is not None
    assert device.proc.wait(60) == 0


@pytest.mark.root
def test_fuzz_the_api_from_its_openapi_document(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    device: SandboxDevice = sandbox(factory(tmp_path, signing_dir))
    before = device.wait_goals()
    token, port = provision_token(device.storage), free_port()
    client = Client(port, token)
    base_url = f"https://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}"}
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]  # fmt: skip
    # Reboot and power off would end the device under test; a follow never ends.
    schema = schemathesis.openapi.from_path(str(OPENAPI)).exclude(tag="commands")
    with api_process(device.storage, device.run_dir, port):
        wait_api(client)
        started = time.monotonic()
        for result in schema.get_all_operations():
            operation = result.ok()
            fixed = {"follow": "false"} if operation.path.startswith("/v1/logs") else None
            for mode in (
                schemathesis.GenerationMode.POSITIVE,
                schemathesis.GenerationMode.NEGATIVE,
            ):
                strategy = operation.as_strategy(generation_mode=mode, query=fixed)

                @settings(max_examples=40, deadline=None, database=None,
                          phases=[Phase.explicit, Phase.generate],
                          suppress_health_check=list(HealthCheck))  # fmt: skip
                @given(case=strategy)
                def run(case: Any) -> None:
                    response = case.call(base_url=base_url, headers=headers, timeout=15,
                                         verify=False)  # fmt: skip
                    case.validate_response(response, checks=checks)

                run()
        assert time.monotonic() - started < 240
        # still serving, PID 1 unaffected
        assert client.request("GET", "/v1/status")[0] == 200
        after = device.status()
        assert after["revision"] == 1 and after["pending"] is None
        assert pids(after)["steady"] == pids(before)["steady"]


def test_rollback_stop_and_halt_over_the_api(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    """The device verbs that were only local take a URL too (#19): rollback (followed
    to its end), stop a container, halt."""
    base = {"hostos": HOSTOS, "steady": app(IDLE)}
    v1 = factory(tmp_path, signing_dir)
    v2 = build_revision(
        tmp_path, signing_dir, 2, {**base, "web": variant(tmp_path, "v2", "echo web v2; " + IDLE)}
    )
    port = free_port()
    device: SandboxDevice = sandbox(v1, *COMMIT, "--api-tcp", f"127.0.0.1:{port}")
    token = provision_token(device.storage)
    wait_api(Client(port, token))
    token_file = credentials_file(device.storage, token, tmp_path / "token")
    url = f"https://127.0.0.1:{port}"
    device.wait_goals()
    assert "UPDATED" in pvpy("device", "push", url, v2, "--token-file", token_file,
                             timeout=120).stdout  # fmt: skip

    out = pvpy("device", "rollback", url, "--token-file", token_file, timeout=120)
    assert "rolling back from revision 2 to revision 1" in out.stdout, out.stdout
    back = device.wait_for("back on 1", lambda s: s["updating"] is None and s["all_goals_met"])
    assert back["revision"] == 1 and back["committed"] == 1
    # nothing older than 1: PID 1 refuses, one line, exit 10
    out = pvpy("device", "rollback", url, "--token-file", token_file, check=False)
    assert out.returncode == 10 and len(out.stderr.strip().splitlines()) == 1, out.stderr

    assert "steady: stop requested" in pvpy("device", "stop", url, "steady",
                                            "--token-file", token_file).stdout  # fmt: skip
    device.wait_for("steady stopped", lambda s: any(
        c["name"] == "steady" and c["status"] == "STOPPED" for c in s["containers"]))  # fmt: skip

    assert "halt: requested" in pvpy("device", "halt", url, "--token-file", token_file).stdout
    assert device.proc is not None
    device.proc.wait(timeout=60)  # halted: the sandbox ends
