"""Pull mode against a registry that misbehaves (pvpy.oci, pvpy.device.puller, #17).

A small threaded HTTP proxy of ours sits on loopback between the puller and Debian's
docker-registry (started as in tests/test_registry.py) and misbehaves on request:
drips, cuts connections at given byte offsets, answers 503 with Retry-After, sends a
truncated body (a Content-Length that lies), other bytes, a huge blob. It logs every
request (its Range header, how many bytes it sent), so tests can assert that a
transfer resumed where it stopped and no byte travelled twice.
"""

from __future__ import annotations

import fcntl
import http.client
import http.server
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pvpy import oci as reg
from pvpy import paths
from pvpy.device import update as up
from pvpy.device.puller import Outcome, Puller
from pvpy.errors import RegistryError
from pvpy.registry import BlobRefusedError, Registry
from pvpy.store import Storage
from tests.device import COMMIT, HOSTOS, IDLE, SandboxDevice, app, build_revision, pvpy
from tests.test_registry import RegistryProcess, records


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryProcess]:
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry not installed (tools/setup installs it)")
    server = RegistryProcess(tmp_path / "registry").start()
    try:
        yield server
    finally:
        server.stop()


# -- the misbehaving proxy ----------------------------------------------------------------


@dataclass
class Fault:
    """What the proxy does to the next request whose path ends with ``target``."""

    kind: str  # cut, drip, 503, truncate, wrong, huge
    target: str
    at: int = 0  # cut/truncate: bytes sent; drip: bytes per tick; 503: Retry-After
    tick: float = 0.5  # drip: seconds between sends
    times: int = 1  # how many requests it hits (-1: all)


@dataclass
class Logged:
    method: str
    path: str
    range: str | None
    status: int = 0
    sent: int = 0  # body bytes written to the client
    fault: str = ""


@dataclass
class Proxy:
    upstream: int
    faults: list[Fault] = field(default_factory=list)
    log: list[Logged] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    port: int = 0
    server: Any = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def fault_for(self, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if path.endswith(fault.target):
                    if fault.times > 0:
                        fault.times -= 1
                        if fault.times == 0:
                            self.faults.remove(fault)
                    return fault
        return None

    def requests(self, target: str) -> list[Logged]:
        with self.lock:
            return [e for e in self.log if e.path.endswith(target)]

    def start(self) -> Proxy:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy.handle(self, "GET")

            def do_HEAD(self) -> None:
                proxy.handle(self, "HEAD")

            def log_message(self, *args: Any) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()

    def handle(self, h: http.server.BaseHTTPRequestHandler, method: str) -> None:
        entry = Logged(method, h.path, h.headers.get("Range"))
        with self.lock:
            self.log.append(entry)
        fault = self.fault_for(h.path) if method == "GET" else None
        entry.fault = fault.kind if fault else ""
        if fault is not None and fault.kind == "503":
            entry.status = 503
            h.send_response(503)
            h.send_header("Retry-After", str(fault.at))
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream, timeout=10)
        headers = {k: v for k, v in h.headers.items() if k.lower() != "host"}
        conn.request(method, h.path, headers=headers)
        response = conn.getresponse()
        body = response.read() if method == "GET" else b""
        conn.close()
        entry.status = response.status
        length = len(body)
        if fault is not None and fault.kind == "truncate":
            body = body[: fault.at]
            length = fault.at  # a Content-Length that lies: the answer looks complete
        elif fault is not None and fault.kind == "wrong":
            flipped = bytearray(body)
            flipped[len(flipped) // 2] ^= 0xFF
            body = bytes(flipped)
        elif fault is not None and fault.kind == "huge":
            body = b"x" * fault.at
            length = len(body)
        h.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("content-length", "connection", "transfer-encoding", "date"):
                h.send_header(name, value)
        h.send_header("Content-Length", str(length) if method == "GET" else
                      response.getheader("Content-Length", "0"))  # fmt: skip
        h.end_headers()
        try:
            if fault is not None and fault.kind == "cut":
                self.send(h, entry, body[: fault.at])
                h.connection.shutdown(socket.SHUT_RDWR)
            elif fault is not None and fault.kind == "drip":
                for i in range(0, len(body), fault.at):
                    if self.stop.wait(fault.tick):
                        break
                    self.send(h, entry, body[i : i + fault.at])
            else:
                self.send(h, entry, body)
        except OSError:
            pass  # the client went away
        h.close_connection = True

    def send(self, h: http.server.BaseHTTPRequestHandler, entry: Logged, data: bytes) -> None:
        h.wfile.write(data)
        h.wfile.flush()
        entry.sent += len(data)


@pytest.fixture
def proxy(registry: RegistryProcess) -> Iterator[Proxy]:
    server = Proxy(registry.port).start()
    try:
        yield server
    finally:
        server.close()


def blob_path(digest: str) -> str:
    return f"/blobs/{digest}"


# -- without a device: the registry client ---------------------------------------------


def publish_blob(registry: RegistryProcess, data: bytes) -> str:
    digest = reg.digest_of(data)
    Registry(registry.host, plain_http=True).upload_blob("fleet/blobs", digest, len(data), data)
    return digest


def test_a_drip_ends_at_the_deadline(registry: RegistryProcess, proxy: Proxy) -> None:
    """One byte every 0.2 s: each read is quick, the whole would take ~55 min; the
    request ends at its deadline all the same, and says so."""
    digest = publish_blob(registry, os.urandom(16 << 10))
    proxy.faults.append(Fault("drip", blob_path(digest), at=1, tick=0.2))
    client = Registry(proxy.host, plain_http=True, timeout=5, deadline=2)
    began = time.monotonic()
    with pytest.raises(RegistryError, match=r"no complete answer within 2 s after \d+ of"):
        client.read_blob("fleet/blobs", digest, 1 << 20)
    assert time.monotonic() - began < 10  # the drip alone would hold it for an hour
    assert 0 < proxy.requests(digest)[0].sent < 50


def test_a_cut_connection_says_how_far_it_got(registry: RegistryProcess, proxy: Proxy) -> None:
    data = os.urandom(300_000)
    digest = publish_blob(registry, data)
    client = Registry(proxy.host, plain_http=True, timeout=5, deadline=10)
    for at in sorted(random.sample(range(1, len(data)), 5)):
        proxy.faults.append(Fault("cut", blob_path(digest), at=at))
        with pytest.raises(RegistryError) as e:
            client.read_blob("fleet/blobs", digest, 1 << 20)
        assert f"connection lost after {at} of {len(data)} bytes" in str(e.value)
        assert "other bytes" not in str(e.value)
    # a Range request gets the rest, and the whole hashes to its name
    with client.open_blob("fleet/blobs", digest, 123_456) as blob:
        assert (blob.start, blob.total) == (123_456, len(data))
        rest = b"".join(iter(lambda: blob.read(1 << 16), b""))
    assert rest == data[123_456:]
    assert proxy.log[-1].range == "bytes=123456-"


def test_retry_after_and_refused_small_blobs(registry: RegistryProcess, proxy: Proxy) -> None:
    data = os.urandom(1000)
    digest = publish_blob(registry, data)
    client = Registry(proxy.host, plain_http=True, timeout=5, deadline=10)
    proxy.faults.append(Fault("503", blob_path(digest), at=7))
    with pytest.raises(RegistryError, match="503"):
        client.read_blob("fleet/blobs", digest, 1 << 20)
    assert client.retry_after == 7
    assert client.read_blob("fleet/blobs", digest, 1 << 20) == data
    assert client.retry_after is None
    # a complete transfer of other bytes, or of too many: refused by digest (remembered)
    proxy.faults.append(Fault("wrong", blob_path(digest)))
    with pytest.raises(BlobRefusedError, match="other bytes"):
        client.read_blob("fleet/blobs", digest, 1 << 20)
    proxy.faults.append(Fault("huge", blob_path(digest), at=5 << 20))
    with pytest.raises(BlobRefusedError, match="larger than"):
        client.read_blob("fleet/blobs", digest, 1 << 20)
    assert proxy.requests(digest)[-1].sent < 5 << 20  # refused by its length, not read


def test_an_upload_in_flight_survives_clean_temp_elsewhere(tmp_path: Path) -> None:
    """`clean_temp` run by another process (a local update) while an object streams in
    (an API upload, a pull) leaves that temp file alone; a dead writer's is cleaned."""
    storage = Storage(tmp_path / "storage").ensure()
    data = os.urandom(3 << 20)
    read_fd, write_fd = os.pipe()
    result: dict[str, Any] = {}

    def put() -> None:
        with open(read_fd, "rb") as stream:
            try:
                result["name"] = storage.objects.put_stream(stream)
            except Exception as e:  # reported below
                result["error"] = e

    writer = threading.Thread(target=put)
    writer.start()
    os.write(write_fd, data[: 1 << 20])
    deadline = time.monotonic() + 10
    while not list(storage.objects.tmp.iterdir()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (storage.objects.tmp / "left-by-a-crash").write_bytes(b"x")
    code = "import sys; from pvpy.store import Storage; Storage(sys.argv[1]).clean_temp()"
    subprocess.run([sys.executable, "-c", code, str(storage.root)], check=True)
    assert [p.name for p in storage.objects.tmp.iterdir()] != ["left-by-a-crash"]
    assert not (storage.objects.tmp / "left-by-a-crash").exists()
    with open(write_fd, "wb") as w:
        w.write(data[1 << 20 :])
    writer.join(10)
    assert "error" not in result, result
    assert storage.objects.read_verified(result["name"]) == data


def test_a_failed_transfer_uses_up_no_revision_number(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "storage").ensure()
    up.write_progress(storage.root, 3, up.DONE, "committed", kind=up.KIND_APP)
    for revision, status, kind in ((4, up.DOWNLOADING, None), (5, up.ERROR, None),
                                   (6, up.QUEUED, None), (7, up.WONTGO, None)):  # fmt: skip
        up.write_progress(storage.root, revision, status, "cut", kind=kind)
    assert up.highest_revision(storage) == 3
    # once PID 1 took it, its number is used, whatever its end
    up.write_progress(storage.root, 5, up.ERROR, "rolled back", kind=up.KIND_APP)
    assert up.highest_revision(storage) == 5


# -- with a sandbox device ---------------------------------------------------------------


def big_variant(tmp_path: Path, name: str, size: int) -> dict[str, Any]:
    """An app on its own image with ``size`` random bytes in it: one big new object."""
    from tests.device import BUSYBOX_TREE

    tree = tmp_path / "trees" / name
    shutil.copytree(BUSYBOX_TREE, tree, symlinks=True)
    (tree / "etc" / "payload").write_bytes(os.urandom(size))
    return {**app(IDLE), "rootfs": {"dir": str(tree), "all_root": True}}


def new_object(old: Path, new: Path) -> tuple[str, int]:
    """The one object ``new`` has that ``old`` has not: its blob digest and size."""
    (name,) = {p.name for p in (new / "objects").iterdir()} - {
        p.name for p in (old / "objects").iterdir()
    }
    return f"sha256:{name}", (new / "objects" / name).stat().st_size


def poll_until(puller: Puller, what: str, attempts: int = 20) -> list[Outcome]:
    """Poll as `pvpy device pull` does (sleeping what ``next_poll`` says) until ``what``."""
    outcomes: list[Outcome] = []
    for _ in range(attempts):
        outcomes.append(puller.poll())
        delay = puller.next_poll(outcomes[-1], 0.2)
        if outcomes[-1].what == what:
            return outcomes
        time.sleep(delay)
    raise AssertionError(f"no {what}: {[str(o) for o in outcomes]}")


def ranges(entries: list[Logged]) -> list[int]:
    return [int(e.range.removeprefix("bytes=").rstrip("-")) if e.range else 0 for e in entries]


@pytest.mark.root
def test_pull_through_a_hostile_proxy(
    tmp_path: Path, sandbox: Any, signing_dir: Path, registry: RegistryProcess, proxy: Proxy
) -> None:
    """Cuts, a 503, a lying Content-Length, a drip, other bytes, a huge state: nothing
    unverified is installed, only verified refusals are WONTGO, every other failure is
    retried (Retry-After honoured) and resumes where it stopped (Range: no byte of an
    object travels twice), and each revision installs once the registry behaves."""
    base = {"hostos": HOSTOS, "steady": app(IDLE)}
    revs = {1: build_revision(tmp_path, signing_dir, 1, {**base, "web": app(IDLE)})}
    for n in (2, 3, 4, 5):
        revs[n] = build_revision(tmp_path, signing_dir, n,
                                 {**base, "web": big_variant(tmp_path, f"v{n}", 1 << 20)})  # fmt: skip
    device: SandboxDevice = sandbox(revs[1], *COMMIT)
    device.wait_goals()
    tag = f"{registry.host}/fleet/hostile:stable"
    client = Registry(proxy.host, plain_http=True, timeout=2, deadline=3)
    puller = Puller(Storage(device.storage), device.run_dir, client,
                    reg.Reference.parse(tag.replace(registry.host, proxy.host)),
                    retry_failed=0.5)  # fmt: skip

    # revision 2: cut at random offsets, a 503 with Retry-After, a body that stops short
    pvpy("state", "publish", revs[2], tag, "--plain-http")
    digest, size = new_object(revs[1], revs[2])
    # cut early (retried after a backoff), then after enough bytes to go on at once
    cuts = [random.randrange(1000, 60_000), random.randrange(70_000, size // 5),
            random.randrange(1000, size // 5)]  # fmt: skip
    proxy.faults += [Fault("cut", digest, at=at) for at in cuts]
    proxy.faults += [Fault("503", digest, at=1), Fault("truncate", digest, at=size // 3)]
    outcomes = poll_until(puller, up.UPDATED)
    retrying = [o for o in outcomes if o.what == "retrying"]
    assert retrying and all(o.revision == 2 for o in retrying)
    assert not any("hash" in o.reason for o in outcomes), outcomes
    assert any(f"connection lost after {cuts[0]} of {size} bytes" in o.reason for o in outcomes)
    assert any("503" in o.reason for o in outcomes)
    blob = proxy.requests(digest)
    assert sum(e.sent for e in blob) == size  # resumed each time: no byte fetched twice
    sent_before = [sum(e.sent for e in blob[:i]) for i in range(len(blob))]
    assert ranges(blob) == sent_before
    assert [e.fault for e in blob] == ["cut", "cut", "cut", "503", "truncate", ""]
    assert records(device.storage)[2]["status"] == up.UPDATED
    assert not (device.storage / "objects" / ".partial").exists() or not any(
        (device.storage / "objects" / ".partial").iterdir()
    )
    device.wait_for("revision 2", lambda s: s["revision"] == 2 and s["updating"] is None, 60)

    # revision 3: a drip. The request ends at its deadline; ERROR, the number not used
    pvpy("state", "publish", revs[3], tag, "--plain-http")
    digest, size = new_object(revs[2], revs[3])
    proxy.faults.append(Fault("drip", digest, at=100, tick=0.2, times=2))
    began = time.monotonic()
    first = puller.poll()
    assert time.monotonic() - began < 30
    assert first.what == "retrying" and "no complete answer within 3 s" in first.reason
    assert records(device.storage)[3]["status"] == up.ERROR
    assert up.highest_revision(Storage(device.storage)) == 2
    assert puller.next_poll(first, 300) < 5  # backoff, not the poll interval
    second = puller.poll()  # another drip: the same bytes are not asked for again
    assert second.what == "retrying"
    assert poll_until(puller, up.UPDATED)[-1].revision == 3
    # each request asked for the rest only: from what the one before had brought
    blob = proxy.requests(digest)
    received = [int(re.findall(r"after (\d+) of", o.reason)[0]) for o in (first, second)]
    assert ranges(blob) == [0, *received] and 0 < received[0] < received[1]
    assert blob[-1].sent == size - received[1]
    device.wait_for("revision 3", lambda s: s["revision"] == 3 and s["updating"] is None, 60)

    # revision 4: other bytes, completely sent: a verified refusal, WONTGO, nothing kept
    pvpy("state", "publish", revs[4], tag, "--plain-http")
    digest, size = new_object(revs[3], revs[4])
    proxy.faults.append(Fault("wrong", digest))
    outcome = puller.poll()
    assert outcome.what == "failed" and "hash to" in outcome.reason, outcome
    assert records(device.storage)[4]["status"] == up.WONTGO
    assert not (device.storage / "objects" / digest.removeprefix("sha256:")).exists()
    assert puller.poll().what == "unchanged"  # not fetched again at once (retry_failed)
    # WONTGO used up no number: the registry fixed, the same revision installs
    time.sleep(0.6)
    assert poll_until(puller, up.UPDATED)[-1].revision == 4
    device.wait_for("revision 4", lambda s: s["revision"] == 4 and s["updating"] is None, 60)

    # revision 5: its state comes as 32 MiB: refused by its length, and remembered
    pvpy("state", "publish", revs[5], tag, "--plain-http")
    state_digest = reg.digest_of((revs[5] / "state.json").read_bytes())
    proxy.faults.append(Fault("huge", state_digest, at=32 << 20, times=-1))
    assert puller.poll().what == "refused"
    for _ in range(3):
        assert puller.poll().what == "unchanged"
    assert len(proxy.requests(state_digest)) == 1
    assert proxy.requests(state_digest)[0].sent < 32 << 20
    assert 5 not in records(device.storage)


def start_puller(device: SandboxDevice, tag: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pvpy", "device", "pull", "--storage", str(device.storage),
             "--run-dir", str(device.run_dir), "--from", tag, "--plain-http", "--interval", "1"],
            stdout=out, stderr=out)  # fmt: skip


def wait_sent(proxy: Proxy, digest: str, at_least: int, puller: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 30
    while (sent := sum(e.sent for e in proxy.requests(digest))) < at_least:
        assert puller.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    return sent


def install_lock_free(storage: Path) -> bool:
    fd = os.open(storage / paths.INSTALL_LOCK, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.root
def test_puller_killed_or_stopped_mid_blob_resumes(
    tmp_path: Path, sandbox: Any, signing_dir: Path, registry: RegistryProcess, proxy: Proxy
) -> None:
    """SIGKILL mid-blob, then a new puller: it asks for the rest only (Range). SIGTERM
    mid-drip: the puller ends at once, the install lock goes, ERROR (not WONTGO), and
    the next puller finishes that revision from where it stopped."""
    base = {"hostos": HOSTOS, "steady": app(IDLE)}
    v1 = build_revision(tmp_path, signing_dir, 1, {**base, "web": app(IDLE)})
    v2 = build_revision(
        tmp_path, signing_dir, 2, {**base, "web": big_variant(tmp_path, "v2", 1 << 20)}
    )
    v3 = build_revision(
        tmp_path, signing_dir, 3, {**base, "web": big_variant(tmp_path, "v3", 1 << 20)}
    )
    device: SandboxDevice = sandbox(v1, *COMMIT)
    device.wait_goals()
    tag = f"{registry.host}/fleet/resume:stable"
    via_proxy = tag.replace(registry.host, proxy.host)
    log = tmp_path / "puller.log"

    pvpy("state", "publish", v2, tag, "--plain-http")
    digest, _ = new_object(v1, v2)
    proxy.faults.append(Fault("drip", digest, at=8192, tick=0.05))
    puller = start_puller(device, via_proxy, log)
    try:
        wait_sent(proxy, digest, 200_000, puller)
        puller.kill()  # a power cut of the puller: no chance to clean up
        puller.wait(10)
        assert records(device.storage)[2]["status"] == up.DOWNLOADING
        kept = Storage(device.storage).objects.partial_size(digest.removeprefix("sha256:"))
        assert 0 < kept <= sum(e.sent for e in proxy.requests(digest))
        assert up.highest_revision(Storage(device.storage)) == 1
        puller = start_puller(device, via_proxy, log)
        device.wait_for("revision 2", lambda s: s["revision"] == 2 and s["updating"] is None, 60)
    finally:
        puller.kill()
        puller.wait(10)
    blob = proxy.requests(digest)
    assert ranges(blob) == [0, kept], blob
    assert records(device.storage)[2]["status"] == up.UPDATED

    pvpy("state", "publish", v3, tag, "--plain-http")
    digest, _ = new_object(v2, v3)
    proxy.faults.append(Fault("drip", digest, at=1, tick=1.0))
    puller = start_puller(device, via_proxy, log)
    try:
        wait_sent(proxy, digest, 2, puller)
        assert not install_lock_free(device.storage)  # the download holds it
        puller.send_signal(signal.SIGTERM)
        began = time.monotonic()
        assert puller.wait(10) == 0
        assert time.monotonic() - began < 5  # not the drip's pace, nor the 120 s deadline
    finally:
        if puller.poll() is None:
            puller.kill()
            puller.wait(10)
    assert install_lock_free(device.storage)
    record = records(device.storage)[3]
    assert record["status"] == up.ERROR and "stopped (SIGTERM)" in record["reason"], record
    kept = Storage(device.storage).objects.partial_size(digest.removeprefix("sha256:"))
    assert kept > 0
    puller = start_puller(device, via_proxy, log)
    try:
        device.wait_for("revision 3", lambda s: s["revision"] == 3 and s["updating"] is None, 60)
    finally:
        puller.send_signal(signal.SIGTERM)
        assert puller.wait(10) == 0
    assert ranges(proxy.requests(digest)) == [0, kept]
    assert records(device.storage)[3]["status"] == up.UPDATED
    assert json.loads(json.dumps(records(device.storage)))  # all records readable


@pytest.mark.root
def test_a_full_disk_fails_the_transfer_not_the_revision(
    tmp_path: Path, signing_dir: Path, registry: RegistryProcess, proxy: Proxy
) -> None:
    """The device's storage on a small tmpfs (in a private mount namespace of its own,
    gone with it): filled up mid-download, the pull is ERROR, its number not used up;
    once space is freed the same revision resumes from the bytes it had, and installs."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) not installed")
    base = {"hostos": HOSTOS, "steady": app(IDLE)}
    v1 = build_revision(tmp_path, signing_dir, 1, {**base, "web": app(IDLE)})
    v2 = build_revision(
        tmp_path, signing_dir, 2, {**base, "web": big_variant(tmp_path, "v2", 2 << 20)}
    )
    storage = tmp_path / "dev"
    storage.mkdir()
    device = SandboxDevice(storage, tmp_path / "dev.log")
    script = (
        'mount -t tmpfs -o size=256m pvpy-test-storage "$1" && '
        '"$2" -m pvpy device provision --storage "$1" --state "$3" --trust "$4" >/dev/null && '
        'exec "$2" -m pvpy device run --storage "$1" "$5" "$6" "$7" "$8"'
    )
    with open(device.log_path, "ab") as log:
        device.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
             str(storage), sys.executable, str(v1), str(signing_dir / "pvpy.pub"), *COMMIT],
            stdout=log, stderr=log,
            env={**os.environ, "PVPY_TEST_FAULTS": "1", "PVPY_LOG_LEVEL": "debug"},
        )  # fmt: skip
    try:
        device.wait_goals(60)
        # the device's storage as its mount namespace sees it
        seen = Path(f"/proc/{device.proc.pid}/root") / str(storage).lstrip("/")
        assert os.statvfs(seen).f_blocks * os.statvfs(seen).f_frsize == 256 << 20
        tag = f"{registry.host}/fleet/full:stable"
        pvpy("state", "publish", v2, tag, "--plain-http")
        digest, size = new_object(v1, v2)
        # leave ~600 KiB: the 2 MiB object cannot fit
        filler = seen / "filler"
        free = os.statvfs(seen).f_bavail * os.statvfs(seen).f_frsize
        with open(filler, "wb") as f:
            f.truncate(0)
            chunk = b"\0" * (1 << 20)
            left = free - (600 << 10)
            while left > 0:
                left -= f.write(chunk[: min(left, len(chunk))])
        client = Registry(proxy.host, plain_http=True, timeout=5, deadline=30)
        puller = Puller(Storage(seen), device.run_dir, client,
                        reg.Reference.parse(tag.replace(registry.host, proxy.host)))  # fmt: skip
        outcome = puller.poll()
        assert outcome.what == "retrying" and "no space left on device" in outcome.reason, outcome
        # ERROR, or DOWNLOADING when even that record found no room: neither uses up 2
        assert records(seen)[2]["status"] in (up.ERROR, up.DOWNLOADING)
        assert up.highest_revision(Storage(seen)) == 1
        kept = Storage(seen).objects.partial_size(digest.removeprefix("sha256:"))
        assert 0 < kept < size
        filler.unlink()
        outcomes = poll_until(puller, up.UPDATED)
        assert outcomes[-1].revision == 2
        assert ranges(proxy.requests(digest)) == [0, kept]
        assert records(seen)[2]["status"] == up.UPDATED
        device.wait_for("revision 2", lambda s: s["revision"] == 2 and s["updating"] is None, 60)
    finally:
        device.kill()
