"""Updates: classification, staging refusals that leave nothing behind, and the
full app-only / reboot / rollback paths in the sandbox."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pvpy.device import update as up
from pvpy.errors import (
    DeviceError,
    ManifestError,
    ObjectCorruptError,
    ObjectMissingError,
    RollbackError,
    SignatureError,
    UntrustedKeyError,
)
from pvpy.signing import SigningKey, TrustStore, generate_key, sign_state
from pvpy.state import State, canonical
from pvpy.store import Storage
from tests.conftest import minimal_state, write_revision
from tests.device import COMMIT, HOSTOS, IDLE, app, build_revision, pvpy, variant

# -- classify -------------------------------------------------------------------


def state_with(**containers: dict[str, Any]) -> State:
    doc = minimal_state()
    ref = doc["containers"]["app"]["rootfs"]
    doc["containers"] = {n: {"rootfs": ref, "args": ["x"], **c} for n, c in containers.items()}
    return State.from_dict(doc)


def test_classify_app_only_changes() -> None:
    old = state_with(os={"role": "host-os"}, a={}, b={}, c={})
    new = state_with(os={"role": "host-os"}, a={}, b={"args": ["y"]}, d={})
    change = up.classify(old, new)
    assert change.kind == up.KIND_APP
    assert (change.changed, change.added, change.removed) == (("b",), ("d",), ("c",))


def test_classify_host_os_or_bsp_change_needs_reboot() -> None:
    old = state_with(os={"role": "host-os"}, a={})
    assert (
        up.classify(old, state_with(os={"role": "host-os", "args": ["z"]}, a={})).kind == "reboot"
    )
    doc = old.to_dict()
    doc["bsp"] = {"kernel": {"sha256": "f" * 64, "size": 1}}
    assert up.classify(old, State.from_dict(doc)).why == "BSP changed"
    doc = old.to_dict()
    doc["groups"] = [{"name": "root"}, {"name": "app", "timeout_ms": 5}]
    assert up.classify(old, State.from_dict(doc)).why == "groups changed"


# -- staging refusals leave nothing behind -----------------------------------------


@pytest.fixture
def device_storage(tmp_path: Path, key: SigningKey) -> Storage:
    """A storage holding revision 5 (installed as if provisioned)."""
    rev = write_revision(tmp_path / "factory", 5, [key], blobs={"app": b"factory app"})
    storage = Storage(tmp_path / "storage").ensure()
    for obj in (rev / "objects").iterdir():
        if not obj.name.startswith("."):
            storage.objects.put_file(obj, expected=obj.name)
    storage.install_revision(
        5, (rev / "state.json").read_bytes(), (rev / "state.sig.json").read_bytes()
    )
    return storage


def snapshot(storage: Storage) -> tuple[set[str], list[int], list[str]]:
    return (
        set(storage.objects.names()),
        storage.revisions(),
        sorted(p.name for p in storage.objects.tmp.iterdir()),
    )


def trust_of(key: SigningKey) -> TrustStore:
    return TrustStore.from_public_keys([key.raw_public])


def test_stage_installs_a_good_revision(
    tmp_path: Path, key: SigningKey, device_storage: Storage
) -> None:
    rev = write_revision(tmp_path / "r6", 6, [key], blobs={"app": b"new app", "db": b"new db"})
    state = up.stage(device_storage.root, rev, trust_of(key))
    assert state.revision == 6 and device_storage.revisions() == [5, 6]
    for ref in state.objects().values():
        device_storage.objects.verify(ref.sha256)
    assert up.read_progress(device_storage.root, 6).status == up.INPROGRESS  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "attack",
    ["bad-signature", "unknown-key", "replay", "schema", "missing-object", "corrupt-object"],
)
def test_refused_updates_leave_nothing_behind(
    tmp_path: Path, key: SigningKey, device_storage: Storage, attack: str
) -> None:
    before = snapshot(device_storage)
    blobs = {"app": b"new app bytes", "db": b"new db bytes" * 1000}
    expected: type[Exception]
    if attack == "bad-signature":
        rev = write_revision(tmp_path / "r", 6, [key], blobs=blobs)
        data = bytearray((rev / "state.json").read_bytes())
        data[data.index(b'"revision":6') + 11] = ord("7")  # signed 6, now says 7
        (rev / "state.json").write_bytes(bytes(data))
        expected = SignatureError
    elif attack == "unknown-key":
        rev = write_revision(tmp_path / "r", 6, [generate_key(tmp_path / "evil")], blobs=blobs)
        expected = UntrustedKeyError
    elif attack == "replay":
        rev = write_revision(tmp_path / "r", 4, [key], blobs=blobs)
        expected = RollbackError
    elif attack == "schema":
        rev = tmp_path / "r"
        rev.mkdir()
        data = canonical.encode({"#spec": "pvpy-state@1", "revision": 6, "containers": {"x": {}}})
        (rev / "state.json").write_bytes(data)
        (rev / "state.sig.json").write_bytes(sign_state(data, [key]))
        expected = ManifestError
    else:
        rev = write_revision(tmp_path / "r", 6, [key], blobs=blobs)
        victim = next(
            p
            for p in sorted((rev / "objects").iterdir())
            if not p.name.startswith(".") and p.stat().st_size > 100
        )
        if attack == "missing-object":
            victim.unlink()
            expected = ObjectMissingError
        else:
            os.chmod(victim, 0o644)
            victim.write_bytes(b"X" + victim.read_bytes()[1:])
            expected = ObjectCorruptError
    with pytest.raises(expected):
        up.stage(device_storage.root, rev, trust_of(key))
    assert snapshot(device_storage) == before
    # recorded under its number only when the trusted key signed that number
    record = up.read_progress(device_storage.root, 7 if attack == "bad-signature" else 6)
    if attack in ("replay", "bad-signature", "unknown-key"):
        assert record is None
    else:
        assert record is not None and record.status == up.WONTGO and record.reason
    refusals = up.last_refusals(device_storage.root)
    if attack in ("bad-signature", "unknown-key"):  # ... else only the bounded refusals say it
        assert [(r["claimed_revision"], r["reason"][:10]) for r in refusals] == [
            (7 if attack == "bad-signature" else 6, "state.json")
        ]
    else:
        assert refusals == []


def test_a_bug_while_verifying_is_a_bug_not_a_refused_revision(
    tmp_path: Path, key: SigningKey, device_storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only pvpy errors are recorded WONTGO: a bug (here a RuntimeError in the
    signature check) propagates, and the revision's number is not marked refused."""
    import pvpy.trust

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in verification")

    before = snapshot(device_storage)
    rev = write_revision(tmp_path / "r6", 6, [key], blobs={"app": b"new app"})
    monkeypatch.setattr(pvpy.trust, "check_signature", broken)
    with pytest.raises(RuntimeError, match="a bug in verification"):
        up.stage(device_storage.root, rev, trust_of(key))
    assert up.read_progress(device_storage.root, 6) is None
    assert snapshot(device_storage) == before


def test_pid1_refusing_is_wontgo_but_a_bug_in_the_hand_over_is_not(
    tmp_path: Path, key: SigningKey, device_storage: Storage
) -> None:
    rev = write_revision(tmp_path / "r6", 6, [key], blobs={"app": b"new app"})
    up.stage(device_storage.root, rev, trust_of(key))

    def bug(message: dict[str, Any], timeout: float) -> dict[str, Any]:
        raise KeyError("cmd")

    with pytest.raises(KeyError):
        up.hand_to_pid1(device_storage, 6, bug)
    record = up.read_progress(device_storage.root, 6)
    assert record is not None and record.status == up.INPROGRESS  # not WONTGO
    assert device_storage.has_revision(6)

    def refuses(message: dict[str, Any], timeout: float) -> dict[str, Any]:
        raise DeviceError("update in progress")

    with pytest.raises(DeviceError):
        up.hand_to_pid1(device_storage, 6, refuses)
    record = up.read_progress(device_storage.root, 6)
    assert record is not None and record.status == up.WONTGO
    assert not device_storage.has_revision(6)  # offered again once the device is ready


DISK_FULL = """
import subprocess, sys
from pathlib import Path
root, rev, pub = map(Path, sys.argv[1:4])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(root / "storage")], check=True)
from pvpy.store import Storage
from pvpy.signing import TrustStore
from pvpy.device import update as up
from pvpy.errors import StoreError
storage = Storage(root / "storage").ensure()
small = storage.objects.put_bytes(b"the running revision")
try:
    up.stage(storage.root, rev, TrustStore.from_files([pub]))
except StoreError as e:
    print("error:", e)
print("progress:", up.read_progress(storage.root, 6).status)
print("objects:", sorted(storage.objects.names()) == [small], list(storage.objects.tmp.iterdir()))
print("trails:", storage.revisions())
"""


@pytest.mark.root
def test_disk_full_while_staging_is_error_and_cleaned(
    tmp_path: Path, key: SigningKey, key_dir: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    rev = write_revision(tmp_path / "r", 6, [key], blobs={"big": os.urandom(3 << 20)})
    (tmp_path / "storage").mkdir()
    out = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            "-c",
            DISK_FULL,
            str(tmp_path),
            str(rev),
            str(key_dir / "pvpy.pub"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "error: store object: no space left on device" in out
    assert "progress: ERROR" in out
    assert "objects: True []" in out
    assert "trails: []" in out


def test_highest_revision_counts_committed_records(device_storage: Storage) -> None:
    assert up.highest_revision(device_storage) == 5
    up.write_progress(device_storage.root, 9, up.DONE, "committed")
    up.write_progress(device_storage.root, 12, up.WONTGO, "bad signature")
    assert up.highest_revision(device_storage) == 9  # a refused number is not used up


# -- the trust root moves forward with each verified install (#13) ------------------------


@pytest.fixture
def provisioned(device_storage: Storage, key_dir: Path) -> Storage:
    """``device_storage`` with its factory key in STORAGE/trust, as provisioned."""
    (device_storage.root / "trust").mkdir()
    (device_storage.root / "trust" / "00-pvpy.pub").write_bytes((key_dir / "pvpy.pub").read_bytes())
    return device_storage


def rotation(tmp_path: Path, key: SigningKey, revision: int = 6) -> tuple[Path, SigningKey]:
    """Revision ``revision`` signed by a new key, shipping key set 1 = {new key}."""
    from pvpy.signing import make_keyset
    from pvpy.trust import KEYSET_FILE

    new_key = generate_key(tmp_path / "new-key")
    rev = write_revision(tmp_path / f"r{revision}", revision, [new_key], blobs={"app": b"v6 app"})
    keyset = make_keyset([new_key.raw_public], version=1, threshold=1, signers=[key, new_key])
    (rev / KEYSET_FILE).write_bytes(keyset)
    return rev, new_key


def test_key_rotation_reaches_the_trust_root(
    tmp_path: Path, key: SigningKey, provisioned: Storage
) -> None:
    from pvpy.trust import KEYSET_FILE, load_trust
    from pvpy.trustroot import load_trust_root

    rev6, new_key = rotation(tmp_path, key)
    up.stage(provisioned.root, rev6, load_trust(provisioned.root))
    # the verified key set is in the trust root, byte for byte, and is what counts now
    assert (provisioned.root / "trust" / "keys-v1-rev6.json").read_bytes() == (
        rev6 / KEYSET_FILE
    ).read_bytes()
    assert not list((provisioned.root / "progress").glob("*.keys.json"))
    trust = load_trust(provisioned.root)
    assert set(trust.keys) == {new_key.keyid} and trust.version == 1

    # a revision signed only by the rotated-out key: refused, nothing installed
    before = snapshot(provisioned)
    old7 = write_revision(tmp_path / "old7", 7, [key], blobs={"app": b"old-key app"})
    with pytest.raises(UntrustedKeyError, match="untrusted key"):
        up.stage(provisioned.root, old7, load_trust(provisioned.root))
    assert snapshot(provisioned) == before
    # the installed revisions stay bootable with the keys they were installed under
    root = load_trust_root(provisioned.root)
    assert set(root.keys_for_installed(5).keys) == {key.keyid}
    assert set(root.keys_for_installed(6).keys) == {new_key.keyid}
    # the new key works, and the same key set shipped again is no rotation
    new7 = write_revision(tmp_path / "new7", 7, [new_key], blobs={"app": b"new-key app"})
    (new7 / KEYSET_FILE).write_bytes((rev6 / KEYSET_FILE).read_bytes())
    assert up.stage(provisioned.root, new7, load_trust(provisioned.root)).revision == 7
    assert sorted(p.name for p in (provisioned.root / "trust").iterdir()) == [
        "00-pvpy.pub", "keys-v1-rev6.json"]  # fmt: skip


def test_boot_verification_after_a_rotation(
    tmp_path: Path, key: SigningKey, provisioned: Storage
) -> None:
    """`pvpy device verify-installed` (PID 1's check at every boot and before an
    apply): the revision installed before the rotation, signed by the old key,
    stays bootable; a trail at or above the rotation signed only by the old key
    (planted on the storage: no path from outside installs one) is refused."""
    from pvpy.trust import load_trust

    rev6, _ = rotation(tmp_path, key)
    up.stage(provisioned.root, rev6, load_trust(provisioned.root))
    planted = write_revision(tmp_path / "r7", 7, [key], blobs={"app": b"v6 app"})
    provisioned.install_revision(7, (planted / "state.json").read_bytes(),
                                 (planted / "state.sig.json").read_bytes())  # fmt: skip

    def verify_installed(revision: int) -> subprocess.CompletedProcess[str]:
        return pvpy("device", "verify-installed", "--storage", provisioned.root,
                    "--revision", revision, check=False)  # fmt: skip

    assert verify_installed(5).returncode == 0  # old key, installed before the rotation
    assert verify_installed(6).returncode == 0  # the rotating revision, new key
    out = verify_installed(7)
    assert out.returncode == 3 and "untrusted key" in out.stderr, out.stderr


STAGE_AND_CUT = """
import sys
from pathlib import Path
from pvpy.device import update as up
from pvpy.trust import load_trust
up.stage(Path(sys.argv[1]), Path(sys.argv[2]), load_trust(Path(sys.argv[1])))
"""


@pytest.mark.parametrize(("point", "rotated"), [("stage:object", False), ("stage:trail", True)])
def test_power_cut_around_the_trust_write(
    tmp_path: Path, key: SigningKey, provisioned: Storage, point: str, rotated: bool
) -> None:
    """The staging process dies (SIGKILL) at the persist point before the trust root
    is written, and at the one after: the device trusts the old keys or the new
    ones, never neither (write_atomic's leftovers are never read)."""
    from pvpy.trust import load_trust

    rev6, new_key = rotation(tmp_path, key)
    result = subprocess.run(
        [sys.executable, "-c", STAGE_AND_CUT, str(provisioned.root), str(rev6)],
        env={**os.environ, "PVPY_POWERCUT": point}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == -9, result.stderr  # the power went at the point
    trust = load_trust(provisioned.root)
    assert set(trust.keys) == {new_key.keyid if rotated else key.keyid}
    # a leftover of a write cut half way changes nothing
    (provisioned.root / "trust" / ".keys-v1-rev6.json.dead.tmp").write_bytes(b'{"keys')
    assert load_trust(provisioned.root) == trust


def test_unverified_refusals_are_bounded(
    tmp_path: Path, key: SigningKey, provisioned: Storage
) -> None:
    """A peer sending a new made-up revision number each time (unsigned, or signed
    by a key the device does not trust) leaves one bounded file, never a record
    per number; anti-rollback does not move."""
    from pvpy.trust import load_trust

    stranger = generate_key(tmp_path / "stranger")
    trust = load_trust(provisioned.root)
    highest = up.highest_revision(provisioned)
    for n in range(1000):
        doc = canonical.encode({"#spec": "pvpy-state@1", "revision": 1000 + n, "containers": {}})
        sig = sign_state(doc, [stranger]) if n % 2 else b'{"#spec":"pvpy-signature@1"}'
        with pytest.raises((UntrustedKeyError, SignatureError)):
            up.verify_incoming(provisioned, doc, sig, None, trust)
    # ... and over the whole staging path too
    rev = write_revision(tmp_path / "r", 5000, [stranger])
    with pytest.raises(UntrustedKeyError):
        up.stage(provisioned.root, rev, trust)
    files = sorted(p.name for p in (provisioned.root / "progress").iterdir())
    assert files == ["refused.json"], files
    refusals = up.last_refusals(provisioned.root)
    assert len(refusals) == up.MAX_REFUSALS and refusals[-1]["claimed_revision"] == 5000
    assert up.highest_revision(provisioned) == highest == 5
    assert up.all_progress(provisioned.root) == []


def test_fleet_binding_over_local_update(
    tmp_path: Path, key: SigningKey, provisioned: Storage
) -> None:
    """Unbound (factory revision names no fleet): takes any revision, and binds to the
    first fleet it installs; then refuses another fleet's revision, and one naming
    none, signed by the same key; takes its own."""
    from pvpy.errors import FleetError
    from pvpy.trustroot import bound_fleet

    assert bound_fleet(provisioned.root) is None
    r6 = write_revision(tmp_path / "r6", 6, [key], fleet="acme/gateway")
    up.stage(provisioned.root, r6, trust_of(key))
    assert (provisioned.root / "trust" / "fleet").read_text() == "acme/gateway\n"
    for name, fleet in (("other", "other/product"), ("none", None)):
        rev = write_revision(tmp_path / name, 7, [key], **({"fleet": fleet} if fleet else {}))
        with pytest.raises(FleetError, match="this device is bound to fleet 'acme/gateway'"):
            up.stage(provisioned.root, rev, trust_of(key))
        assert not provisioned.has_revision(7)
        assert up.read_progress(provisioned.root, 7).status == up.WONTGO  # type: ignore[union-attr]
        (provisioned.root / "progress" / "7.json").unlink()
    ours = write_revision(tmp_path / "ours", 7, [key], fleet="acme/gateway")
    assert up.stage(provisioned.root, ours, trust_of(key)).fleet == "acme/gateway"


def test_fleet_of_the_factory_revision_binds(tmp_path: Path, key: SigningKey) -> None:
    """A device provisioned with a revision naming a fleet is bound before any update."""
    from pvpy.errors import FleetError

    factory = write_revision(tmp_path / "f", 1, [key], fleet="acme/gateway")
    storage = Storage(tmp_path / "storage").ensure()
    storage.install_revision(1, (factory / "state.json").read_bytes(),
                             (factory / "state.sig.json").read_bytes())  # fmt: skip
    other = write_revision(tmp_path / "o", 2, [key], fleet="other/product")
    with pytest.raises(FleetError):
        up.stage(storage.root, other, trust_of(key))


def test_time_floor_over_staging(tmp_path: Path, key: SigningKey, provisioned: Storage) -> None:
    """The device verified a revision created on 2027-06-01; its clock then says 1970
    (no RTC): an expired revision is still refused, a fresh one accepted."""
    import datetime as dt

    from pvpy.errors import ExpiredError
    from pvpy.trust import read_revision_dir

    r6 = write_revision(tmp_path / "r6", 6, [key], created="2027-06-01T00:00:00Z")
    up.stage(provisioned.root, r6, trust_of(key))
    assert (provisioned.root / "trust" / "time-floor").read_text() == "2027-06-01T00:00:00Z\n"
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    expired = write_revision(tmp_path / "x", 7, [key], expires="2027-01-01T00:00:00Z")
    with pytest.raises(ExpiredError, match="expired at 2027-01-01"):
        up.verify_incoming(provisioned, *read_revision_dir(expired), trust_of(key), now=epoch)
    fresh = write_revision(tmp_path / "f", 7, [key], created="2027-06-02T00:00:00Z",
                           expires="2027-12-01T00:00:00Z")  # fmt: skip
    verified = up.verify_incoming(provisioned, *read_revision_dir(fresh), trust_of(key), now=epoch)
    assert verified.revision == 7
    # an older `created` never moves the floor back
    older = write_revision(tmp_path / "o", 8, [key], created="2026-01-01T00:00:00Z")
    up.stage(provisioned.root, older, trust_of(key))
    assert (provisioned.root / "trust" / "time-floor").read_text() == "2027-06-01T00:00:00Z\n"


# -- in the sandbox ------------------------------------------------------------------


def revisions(tmp_path: Path, keys: Path) -> dict[str, Path]:
    data = {
        "rootfs": {"dir": str(Path(HOSTOS["rootfs"]["dir"]).parent / "hello"), "all_root": True},
        "args": ["/usr/bin/hello"],
        "volumes": [{"name": "data", "target": "/data", "persistence": "permanent"}],
    }
    base = {"hostos": HOSTOS, "steady": app(IDLE), "counter": data}
    return {
        "v1": build_revision(tmp_path, keys, 1, {**base, "web": app("echo v1; " + IDLE)}),
        "v2": build_revision(
            tmp_path, keys, 2, {**base, "web": variant(tmp_path, "v2", "echo v2; " + IDLE)}
        ),
        "crash": build_revision(
            tmp_path,
            keys,
            3,
            {
                **base,
                "web": variant(
                    tmp_path,
                    "crash",
                    "exit 1",
                    restart={"policy": "always", "backoff_initial_ms": "100ms"},
                ),
            },
        ),
        "bsp": build_revision(
            tmp_path,
            keys,
            4,
            {
                **base,
                "hostos": {**HOSTOS, "args": ["/sbin/init", "new"]},
                "web": variant(tmp_path, "v4", "echo v4; " + IDLE),
            },
        ),
        "badbsp": build_revision(
            tmp_path,
            keys,
            5,
            {
                **base,
                "hostos": {**HOSTOS, "args": ["/bin/sh", "-c", "exit 7"]},
                "web": variant(tmp_path, "v5", "echo v5; " + IDLE),
            },
        ),
    }


def pids(status: dict[str, Any]) -> dict[str, int]:
    return {c["name"]: c["pid"] for c in status["containers"]}


@pytest.mark.root
def test_app_update_rollback_and_reboot_update(
    tmp_path: Path, sandbox: Any, signing_dir: Path
) -> None:
    revs = revisions(tmp_path, signing_dir)
    device = sandbox(revs["v1"], *COMMIT)
    before = pids(device.wait_goals())

    # app-only: just web restarts, the others keep their processes
    result = pvpy("device", "update", revs["v2"], "--storage", device.storage, timeout=90)
    assert "UPDATED" in result.stdout
    after = device.wait_goals()
    assert after["revision"] == 2 and after["committed"] == 2
    now = pids(after)
    assert now["web"] != before["web"]
    assert {k: v for k, v in now.items() if k != "web"} == {
        k: v for k, v in before.items() if k != "web"
    }

    # a crash-looping app: rolled back without a reboot, reported ERROR
    result = pvpy(
        "device", "update", revs["crash"], "--storage", device.storage, check=False, timeout=90
    )
    assert result.returncode == 3 and "ERROR rolled back: web exited" in result.stdout
    back = device.wait_for("v2 back", lambda s: s["updating"] is None and s["all_goals_met"])
    assert back["revision"] == 2 and back["committed"] == 2
    assert {k: v for k, v in pids(back).items() if k != "web"} == {
        k: v for k, v in now.items() if k != "web"
    }

    # an older revision: refused, nothing changes
    result = pvpy("device", "update", revs["v1"], "--storage", device.storage, check=False)
    assert result.returncode == 3 and "not newer" in result.stderr
    assert device.status()["revision"] == 2

    # host OS change: try-boot, TESTING, commit, DONE
    result = pvpy("device", "update", revs["bsp"], "--storage", device.storage, timeout=120)
    assert "DONE" in result.stdout and "TESTING" in result.stdout
    done = device.wait_goals()
    assert done["revision"] == 4 and done["committed"] == 4 and done["try"] is None
    assert [e.get("event") for e in device.events()].count("reboot") >= 1

    # a host OS that dies in its try boot: back on 4, 5 reported ERROR
    result = pvpy(
        "device", "update", revs["badbsp"], "--storage", device.storage, check=False, timeout=120
    )
    assert result.returncode == 3 and "ERROR" in result.stdout
    final = device.wait_goals()
    assert final["revision"] == 4 and final["committed"] == 4 and final["try"] is None
    states = {u["revision"]: u["status"] for u in final["updates"]}
    assert states == {2: "UPDATED", 3: "ERROR", 4: "DONE", 5: "ERROR"}
    # permanent data survived every update and reboot: the counter only grew
    runs = int((device.storage / "disks/permanent/counter/volumes/data/runs").read_text())
    assert runs >= 3

    # user rollback: to the newest good revision before the running one
    result = pvpy("device", "rollback", "--storage", device.storage, timeout=120)
    assert "rolling back from revision" in result.stdout and "to revision 2" in result.stdout
    rolled = device.wait_goals()
    assert rolled["revision"] == 2 and rolled["committed"] == 2


def test_boot_counting_abandons_a_try_after_n_boots(tmp_path: Path) -> None:
    from pvpy.device.bootenv import choose_boot, open_bootenv

    env = open_bootenv(f"file:{tmp_path / 'bootenv'}")
    env.write({"pv_rev": "3", "pv_try": "4"})
    choices = [choose_boot(env, max_tries=3) for _ in range(4)]
    assert [(c.revision, c.trying) for c in choices] == [
        (4, True),
        (4, True),
        (4, True),
        (3, False),
    ]
    assert choices[-1].failed_try == 4
    assert env.read()["pv_bootcount"] == "3"


def test_status_counts_down_while_testing(tmp_path: Path, sandbox: Any, signing_dir: Path) -> None:
    """While an update is TESTING, status says for how long, when it commits (every
    goal held so far) or when it gives up: a number, and a line people read."""
    revs = revisions(tmp_path, signing_dir)
    device = sandbox(revs["v1"], "--commit-delay", "6", "--commit-timeout", "60")
    device.wait_goals()
    update = subprocess.Popen(
        [sys.executable, "-m", "pvpy", "device", "update", str(revs["v2"]), "--storage",
         str(device.storage)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        status = device.wait_for(
            "a commit countdown",
            lambda s: bool(s.get("testing")) and s["testing"]["commit_in"] is not None,
            timeout=60,
        )
        countdown = status["testing"]
        assert countdown["revision"] == 2 and 0 < countdown["commit_in"] <= 6
        assert 0 < countdown["gives_up_in"] <= 60 and countdown["for"] >= 0
        shown = pvpy("device", "status", "--storage", device.storage).stdout
        assert "updating   2 (TESTING for" in shown and "commits in" in shown, shown
        out, _ = update.communicate(timeout=90)
    finally:
        if update.poll() is None:
            update.kill()
    assert "UPDATED" in out
    assert device.status()["testing"] is None
