"""Object store and storage trails: names, hashes, crash safety, GC."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvpy.errors import (
    ObjectCorruptError,
    ObjectMissingError,
    ObjectNameError,
    StoreError,
)
from pvpy.state import canonical
from pvpy.store import ObjectStore, Storage, referenced_objects, remove_tree, write_atomic
from tests.conftest import minimal_state


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return ObjectStore(tmp_path / "objects").ensure()


def test_put_and_read_verified(store: ObjectStore) -> None:
    name = store.put_bytes(b"hello")
    assert name == sha(b"hello")
    assert store.has(name)
    assert store.read_verified(name) == b"hello"
    store.verify(name, size=5)
    assert list(store.names()) == [name]
    # same bytes again: same object, nothing duplicated
    assert store.put_bytes(b"hello") == name
    assert list(store.names()) == [name]


@pytest.mark.parametrize(
    "bad",
    [
        "../../etc/passwd",
        "A" * 64,
        "a" * 63,
        "a" * 65,
        "",
        "/abs",
        "a" * 64 + "/x",
        ".tmp",
        "a" * 64 + "\n",
    ],
)
def test_names_that_are_not_sha256_are_refused(store: ObjectStore, bad: str) -> None:
    with pytest.raises(ObjectNameError):
        store.path(bad)
    with pytest.raises(ObjectNameError):
        store.has(bad)
    with pytest.raises(ObjectNameError):
        store.put_bytes(b"x", expected=bad)


def test_wrong_expected_hash_stores_nothing(store: ObjectStore) -> None:
    with pytest.raises(ObjectCorruptError, match="hash to"):
        store.put_bytes(b"evil", expected=sha(b"good"))
    assert list(store.names()) == []
    assert list(store.tmp.iterdir()) == []


def test_oversized_stream_stores_nothing(store: ObjectStore) -> None:
    import io

    with pytest.raises(ObjectCorruptError, match="larger"):
        store.put_stream(io.BytesIO(b"x" * 100), max_size=10)
    assert list(store.names()) == []


def test_corruption_is_detected_on_read(store: ObjectStore) -> None:
    name = store.put_bytes(b"precious bytes")
    path = store.path(name)
    os.chmod(path, 0o644)
    raw = bytearray(path.read_bytes())
    raw[3] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ObjectCorruptError):
        store.verify(name)
    with pytest.raises(ObjectCorruptError):
        store.read_verified(name)
    with pytest.raises(ObjectMissingError):
        store.verify(sha(b"never stored"))
    # truncation is caught by size before hashing
    path.write_bytes(b"pre")
    with pytest.raises(ObjectCorruptError, match="bytes, expected"):
        store.verify(name, size=14)


WRITER = """
import sys, time
from pathlib import Path
from pvpy.store import ObjectStore

class Slow:
    def __init__(self):
        self.n = 0
    def read(self, size):
        self.n += 1
        if self.n == 3:
            print("midway", flush=True)
            time.sleep(60)
        return b"x" * (1 << 20)

ObjectStore(Path(sys.argv[1])).put_stream(Slow())
"""


def test_write_killed_midway_leaves_no_partial_object(store: ObjectStore) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(store.root)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "midway"
    # Two MiB are written to a temp file by now; kill the writer like a power cut.
    leftovers = list(store.tmp.iterdir())
    assert len(leftovers) == 1 and leftovers[0].stat().st_size == 2 << 20
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(store.names()) == []  # nothing visible under an object name
    assert store.clean_temp() == 1
    assert list(store.tmp.iterdir()) == []


def test_write_atomic_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


FULL_DISK = """
import sys, subprocess
from pathlib import Path
from pvpy.errors import StoreError
from pvpy.store import ObjectStore
root = Path(sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], check=True)
store = ObjectStore(root / "objects").ensure()
small = store.put_bytes(b"kept")
try:
    store.put_bytes(b"x" * (4 << 20))
except StoreError as e:
    print("error:", e)
print("names:", sorted(store.names()) == [small], "tmp:", list(store.tmp.iterdir()))
print("kept:", store.read_verified(small) == b"kept")
"""


@pytest.mark.root
def test_full_disk_is_a_store_error_and_loses_nothing(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    # A private mount namespace: the tmpfs vanishes with the process.
    out = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            "-c",
            FULL_DISK,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "error: store object: no space left on device" in out
    assert "names: True tmp: []" in out
    assert "kept: True" in out


def test_referenced_objects_walks_any_document() -> None:
    doc = minimal_state(bsp={"kernel": {"sha256": "b" * 64, "size": 1}})
    assert referenced_objects(doc) == {"a" * 64, "b" * 64}


def install(storage: Storage, revision: int, blobs: list[bytes]) -> list[str]:
    names = [storage.objects.put_bytes(b) for b in blobs]
    doc = minimal_state(revision)
    doc["containers"] = {
        f"c{i}": {"rootfs": {"sha256": n, "size": 1, "format": "squashfs"}, "args": ["x"]}
        for i, n in enumerate(names)
    }
    storage.install_revision(revision, canonical.encode(doc), b"{}")
    return names


def test_gc_keeps_what_pinned_revisions_reference(tmp_path: Path) -> None:
    storage = Storage(tmp_path).ensure()
    shared, old_only = install(storage, 1, [b"base", b"old app"])
    _, new_only = install(storage, 2, [b"base", b"new app"])
    _, third = install(storage, 3, [b"base", b"third app"])
    stray = storage.objects.put_bytes(b"unreferenced")

    result = storage.gc(pinned=[2, 3])
    assert set(result.removed_objects) == {old_only, stray}
    assert result.removed_revisions == [1]
    assert storage.revisions() == [2, 3]
    assert set(storage.objects.names()) == {shared, new_only, third}
    for name in storage.objects.names():
        storage.objects.verify(name)  # kept objects are intact


def test_gc_refuses_when_a_pinned_revision_is_unreadable(tmp_path: Path) -> None:
    storage = Storage(tmp_path).ensure()
    install(storage, 1, [b"base"])
    install(storage, 2, [b"other"])
    (storage.trail(2) / "state.json").write_bytes(b"{garbage")
    before = set(storage.objects.names())
    with pytest.raises(StoreError, match="unreadable"):
        storage.gc(pinned=[1, 2])
    with pytest.raises(StoreError, match="not installed"):
        storage.gc(pinned=[1, 9])
    assert set(storage.objects.names()) == before
    assert storage.revisions() == [1, 2]


def test_trails_are_immutable_and_atomic(tmp_path: Path) -> None:
    storage = Storage(tmp_path).ensure()
    install(storage, 1, [b"base"])
    with pytest.raises(StoreError, match="already installed"):
        storage.install_revision(1, b"{}", b"{}")
    # A crash while installing leaves a temp dir that is not a revision.
    (storage.trails / ".tmp-2-deadbeef").mkdir()
    assert storage.revisions() == [1]
    storage.clean_temp()
    assert [p.name for p in storage.trails.iterdir()] == ["1"]
    storage.remove_revision(1)
    assert storage.revisions() == []


def test_install_in_a_killed_process_is_all_or_nothing(tmp_path: Path) -> None:
    """Kill installs at random moments: a trail is either complete or absent."""
    script = (
        "import sys; from pathlib import Path; from pvpy.store import Storage\n"
        "s = Storage(Path(sys.argv[1])).ensure()\n"
        "for r in range(1, 100000):\n"
        "    s.install_revision(r, b'S' * 65536, b'G' * 1024)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)])
    time.sleep(1.0)
    proc.kill()
    proc.wait()
    storage = Storage(tmp_path)
    revs = storage.revisions()
    assert revs, "no revision installed within a second"
    for r in revs:
        state, sig = storage.read_trail(r)
        assert state == b"S" * 65536 and sig == b"G" * 1024


def test_remove_tree_removes_everything_and_follows_no_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    work = tmp_path / "work"
    (work / "work" / "deep").mkdir(parents=True)
    (work / "work" / "deep" / "file").write_text("x")
    if os.geteuid() == 0:
        (work / "work").chmod(0)  # as overlayfs leaves its work/work (PID 1 is root)
    (work / "link-dir").symlink_to(outside)
    (work / "link-file").symlink_to(outside / "keep")
    (work / "dangling").symlink_to(tmp_path / "nowhere")
    remove_tree(work)
    assert not os.path.lexists(work)
    assert (outside / "keep").read_text() == "keep"


def test_remove_tree_of_nothing_is_fine(tmp_path: Path) -> None:
    remove_tree(tmp_path / "missing")


def test_remove_tree_of_a_link_removes_the_link_only(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    (tmp_path / "link").symlink_to(outside)
    remove_tree(tmp_path / "link")
    assert not os.path.lexists(tmp_path / "link")
    assert (outside / "keep").read_text() == "keep"
