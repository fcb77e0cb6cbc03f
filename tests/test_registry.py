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
from pvpy.errors import UsageError
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

    def __init__(self, root: Path) -> None:
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
            f"http: {{addr: '127.0.0.1:{self.port}'}}\n"
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
                if conn.getresponse().status == 200:
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
        client = reg.Registry(self.host, plain_http=True)
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
    client = reg.Registry(registry.host, plain_http=True)
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
    with pytest.raises(reg.RegistryError, match="DIGEST_INVALID"):
        pub.publish(client, ref, bad, say=lines.append)
    assert registry.manifest("fleet/demo", "stable")["annotations"]["org.pvpy.revision"] == "2"
    # the CLI: same thing, exit 0; a registry that is not there: exit 11
    out = pvpy("state", "publish", r1, f"{registry.host}/fleet/other:stable", "--plain-http")
    assert "sent 5 blob(s)" in out.stdout
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
        with pytest.raises(reg.RegistryError, match="not a pvpy revision"):
            reg.parse_manifest_unverified(json.dumps(broken).encode())
    with pytest.raises(reg.RegistryError):
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

    # signed by a key the device does not trust: WONTGO once, however often it is polled
    objects = stored_objects(device.storage)
    publish(v3)
    out = pull_once()
    assert out.returncode == 3 and "refused" in out.stdout, out.stdout + out.stderr
    refused = records(device.storage)[3]
    assert refused["status"] == "WONTGO" and "key" in refused["reason"]
    for _ in range(2):
        assert pull_once().returncode == 3
    assert records(device.storage)[3] == refused  # not written again
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
    assert records(device.storage)[3] == refused

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
