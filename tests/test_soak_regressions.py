"""What the soak runs (#14) found, each as a direct, fast test of its own; and the
GC request the soak drives (``pvpy device gc``: the control request "gc")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pvpy.device.apply import Applier, UpdateRun
from pvpy.store import Storage
from tests.device import pvpy
from tests.test_gc import Host
from tests.test_store import install


class Idle:
    """A supervisor whose running containers use the trails of ``in_use``."""

    def __init__(self, in_use: set[int]) -> None:
        self.in_use = in_use

    def revisions_in_use(self) -> set[int]:
        return set(self.in_use)


def test_gc_on_request_keeps_the_pinned_and_in_use_trails(tmp_path: Path) -> None:
    storage = Storage(tmp_path).ensure()
    for revision in (1, 2, 3, 4, 5):
        install(storage, revision, [b"object of %d" % revision])
    host: Any = Host(tmp_path, 5)
    host.supervisor = Idle({2})  # a container still runs on revision 2's writable layer
    applier = Applier(host)

    reply = applier.gc_now()

    # running (5), the newest good before it (4), in use (2); 1 and 3 are garbage
    assert reply["ok"] and reply["removed"] == [1, 3], reply
    assert reply["pinned"] == [4, 5] and reply["kept_in_use"] == [2]
    assert storage.revisions() == [2, 4, 5]
    assert applier.gc_owed == {2}  # collected as soon as that container moves on


def test_gc_on_request_waits_for_the_update_under_way(tmp_path: Path) -> None:
    storage = Storage(tmp_path).ensure()
    for revision in (1, 2, 3):
        install(storage, revision, [b"object of %d" % revision])
    host: Any = Host(tmp_path, 2)
    host.supervisor = Idle(set())
    applier = Applier(host)
    applier.update = UpdateRun(3, "app", "testing")

    reply = applier.gc_now()

    assert not reply["ok"] and "update to 3 in progress" in reply["error"]
    assert storage.revisions() == [1, 2, 3]  # nothing removed


def test_gc_verb_without_a_device(tmp_path: Path) -> None:
    result = pvpy("device", "gc", "--storage", tmp_path, check=False)
    assert result.returncode == 10, result.stderr  # a device error: none answers
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_update_heals_a_stored_object_corrupted_on_disk(tmp_path: Path) -> None:
    """A bit flip in a stored object that an installed revision names (the soak's
    corrupt-installed step: rollback target r4 refused, still installed) used to make
    every later update naming that object WONTGO "corrupt" until r4 was collected:
    staging checked the stored copy, found it corrupt, and kept it because r4 named it.
    The update carries the good bytes: staging now replaces the corrupt copy with them."""
    from pvpy.device import update as up
    from pvpy.signing import TrustStore, generate_key
    from tests.conftest import write_revision

    key = generate_key(tmp_path / "key")
    trust = TrustStore.from_public_keys([key.raw_public])
    storage = Storage(tmp_path / "storage").ensure()
    r4 = write_revision(tmp_path / "r4", 4, [key], blobs={"app": b"shared image"})
    up.stage(storage.root, r4, trust)
    (name,) = storage.referenced_by(4)
    path = storage.objects.path(name)
    path.write_bytes(b"shared imagX")  # the bad sector

    r5 = write_revision(tmp_path / "r5", 5, [key], blobs={"app": b"shared image"})
    state = up.stage(storage.root, r5, trust)

    assert state.revision == 5 and storage.revisions() == [4, 5]
    storage.objects.verify(name)  # healed: r4 boots again too
    assert up.read_progress(storage.root, 5).status == up.INPROGRESS  # type: ignore[union-attr]


def test_a_rollback_cut_short_leaves_its_target_good(tmp_path: Path) -> None:
    """Found by the soak: a rollback writes a new record over its target's DONE one;
    a power cut before it ended made the next boot call the target ERROR, and a good
    revision stopped being a fallback. It is as good as it was."""
    from pvpy.device import update as up
    from pvpy.device.apply import reconcile_records

    storage = Storage(tmp_path).ensure()
    for revision in (1, 2):
        install(storage, revision, [b"object of %d" % revision])
    up.write_progress(tmp_path, 1, up.DONE, "committed", 100, kind=up.KIND_REBOOT)
    up.write_progress(tmp_path, 2, up.UPDATED, "committed", 100, kind=up.KIND_APP)
    # the user rolls back from 2 to 1: PID 1 re-applies 1, then the power goes
    up.write_progress(tmp_path, 1, up.INPROGRESS, "rolling back", kind=up.KIND_APP)
    up.write_progress(tmp_path, 1, up.TESTING, "rolling back", kind=up.KIND_APP)
    host: Any = Host(tmp_path, 2)  # pv_rev still 2: the rollback never committed
    host.boot_revision, host.boot_trying, host.failed_try = 2, False, None
    host.failed_try_reason = None

    assert reconcile_records(host, booted=2) is None

    one = up.read_progress(tmp_path, 1)
    assert one is not None and one.status == up.DONE, one
    assert "interrupted" in one.reason and one.good_before == ""
    assert up.good_revisions_below(storage, 2) == [1]  # still what a rollback goes to
    # a revision that never was good, cut the same way, is ERROR as before
    up.write_progress(tmp_path, 3, up.INPROGRESS, "staged", 100)
    up.write_progress(tmp_path, 3, up.TESTING, "applying", kind=up.KIND_APP)
    reconcile_records(host, booted=2)
    three = up.read_progress(tmp_path, 3)
    assert three is not None and three.status == up.ERROR


def test_gc_verb_on_a_device_prints_what_it_did(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    from tests.device import COMMIT, HOSTOS, build_revision

    device = sandbox(build_revision(tmp_path, signing_dir, 1, {"hostos": HOSTOS}), *COMMIT)
    device.wait_goals()
    out = pvpy("device", "gc", "--storage", device.storage).stdout
    assert out.startswith("gc: removed revisions none;"), out
    doc = json.loads(pvpy("device", "gc", "--storage", device.storage, "--json").stdout)
    assert doc["removed"] == [] and doc["pinned"] == [1], doc
