"""Signing and verification: tampering, untrusted keys, rollback, expiry, rotation."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
from pathlib import Path

import pytest

from pvpy.errors import (
    DeviceError,
    ExpiredError,
    FleetError,
    KeyFileError,
    ManifestError,
    ObjectCorruptError,
    ObjectMissingError,
    PvpyError,
    RollbackError,
    SignatureError,
    TrustError,
    UntrustedKeyError,
)
from pvpy.signing import (
    SigningKey,
    TrustStore,
    generate_key,
    load_public_key,
    make_keyset,
    sign_state,
)
from pvpy.state import canonical
from pvpy.trust import (
    KEYSET_FILE,
    load_trust,
    read_revision_dir,
    trusted_now,
    verify_revision,
    verify_revision_dir,
)
from pvpy.trustroot import load_trust_root
from tests.conftest import write_revision


def trust_of(*keys: SigningKey) -> TrustStore:
    return TrustStore.from_public_keys(k.raw_public for k in keys)


def test_good_revision_verifies(tmp_path: Path, key: SigningKey) -> None:
    rev = write_revision(tmp_path / "rev", 3, [key])
    verified = verify_revision_dir(rev, trust_of(key))
    assert verified.revision == 3
    assert verified.signed_by == (key.keyid,)


def test_public_key_file_round_trip(tmp_path: Path, key: SigningKey, key_dir: Path) -> None:
    assert load_public_key(key_dir) == key.raw_public
    assert oct((key_dir / "pvpy.key").stat().st_mode & 0o777) == "0o600"
    trust = TrustStore.from_files([key_dir / "pvpy.pub"])
    assert key.keyid in trust.keys


def flip(path: Path, index: int, bit: int = 0) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[index] ^= 1 << bit
    path.write_bytes(bytes(data))


def every_position(path: Path) -> list[int]:
    return list(range(path.stat().st_size))


def test_every_flipped_byte_of_state_is_rejected(tmp_path: Path, key: SigningKey) -> None:
    rev = write_revision(tmp_path / "rev", 3, [key])
    state = rev / "state.json"
    original = state.read_bytes()
    trust = trust_of(key)
    for i in every_position(state):
        for bit in (0, 5):
            state.write_bytes(original)
            flip(state, i, bit)
            with pytest.raises(PvpyError):
                verify_revision_dir(rev, trust)
    state.write_bytes(original)
    verify_revision_dir(rev, trust)


def test_every_flipped_byte_of_envelope_is_rejected(tmp_path: Path, key: SigningKey) -> None:
    rev = write_revision(tmp_path / "rev", 3, [key])
    sig = rev / "state.sig.json"
    original = sig.read_bytes()
    trust = trust_of(key)
    for i in every_position(sig):
        for bit in range(8):
            sig.write_bytes(original)
            flip(sig, i, bit)
            with pytest.raises(TrustError):
                verify_revision_dir(rev, trust)


def test_flipped_byte_in_any_object_is_rejected(tmp_path: Path, key: SigningKey) -> None:
    blobs = {"a": os.urandom(5000), "b": os.urandom(3000)}
    rev = write_revision(tmp_path / "rev", 3, [key], blobs=blobs)
    trust = trust_of(key)
    rng = random.Random(7)
    for obj in sorted((rev / "objects").iterdir()):
        if obj.name.startswith("."):
            continue
        original = obj.read_bytes()
        for i in [0, len(original) - 1, *rng.sample(range(len(original)), 20)]:
            flip(obj, i, rng.randrange(8))
            with pytest.raises(ObjectCorruptError):
                verify_revision_dir(rev, trust)
            obj.write_bytes(original)
        verify_revision_dir(rev, trust)


def test_missing_object_is_rejected(tmp_path: Path, key: SigningKey) -> None:
    rev = write_revision(tmp_path / "rev", 3, [key])
    for obj in (rev / "objects").iterdir():
        if not obj.name.startswith("."):
            obj.unlink()
    with pytest.raises(ObjectMissingError):
        verify_revision_dir(rev, trust_of(key))
    # ... unless the caller only checks the state (objects are fetched later)
    verify_revision_dir(rev, trust_of(key), check_objects=False)


def test_unsigned_and_untrusted_are_rejected(tmp_path: Path, key: SigningKey) -> None:
    other = generate_key(tmp_path / "other")
    rev = write_revision(tmp_path / "rev", 3, [other])
    with pytest.raises(UntrustedKeyError, match="untrusted key"):
        verify_revision_dir(rev, trust_of(key))
    (rev / "state.sig.json").unlink()
    with pytest.raises(SignatureError, match="not signed"):
        verify_revision_dir(rev, trust_of(key))


def test_signature_with_a_trusted_keyid_but_other_key_is_bad(
    tmp_path: Path, key: SigningKey
) -> None:
    other = generate_key(tmp_path / "other")
    rev = write_revision(tmp_path / "rev", 3, [other])
    env = json.loads((rev / "state.sig.json").read_bytes())
    env["signatures"][0]["keyid"] = key.keyid  # claim to be the trusted key
    (rev / "state.sig.json").write_bytes(canonical.encode(env))
    with pytest.raises(SignatureError, match="bad signature"):
        verify_revision_dir(rev, trust_of(key))


def test_replayed_older_revision_is_refused(tmp_path: Path, key: SigningKey) -> None:
    old = write_revision(tmp_path / "old", 4, [key])
    new = write_revision(tmp_path / "new", 5, [key])
    trust = trust_of(key)
    current = verify_revision_dir(new, trust).revision
    with pytest.raises(RollbackError, match="not newer"):
        verify_revision_dir(old, trust, current_revision=current)
    with pytest.raises(RollbackError):
        verify_revision_dir(new, trust, current_revision=current)  # same one again


def test_expired_revision_is_refused(tmp_path: Path, key: SigningKey) -> None:
    rev = write_revision(tmp_path / "rev", 3, [key], expires="2027-01-01T00:00:00Z")
    trust = trust_of(key)
    before = dt.datetime(2026, 12, 31, tzinfo=dt.UTC)
    after = dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    verify_revision_dir(rev, trust, now=before)
    with pytest.raises(ExpiredError, match="expired at 2027-01-01T00:00:00Z"):
        verify_revision_dir(rev, trust, now=after)


def test_signed_but_invalid_state_is_rejected(tmp_path: Path, key: SigningKey) -> None:
    rev = tmp_path / "rev"
    rev.mkdir()
    data = canonical.encode({"#spec": "pvpy-state@1", "revision": 1, "containers": {"x": {}}})
    (rev / "state.json").write_bytes(data)
    (rev / "state.sig.json").write_bytes(sign_state(data, [key]))
    with pytest.raises(ManifestError, match=r"^\$\.containers\.x: 'rootfs' is a required"):
        verify_revision_dir(rev, trust_of(key))
    # non-canonical bytes are refused even when signed
    pretty = json.dumps(json.loads(data), indent=1).encode()
    (rev / "state.json").write_bytes(pretty)
    (rev / "state.sig.json").write_bytes(sign_state(pretty, [key]))
    with pytest.raises(ManifestError, match="canonical"):
        verify_revision_dir(rev, trust_of(key))


def test_threshold_needs_enough_distinct_keys(tmp_path: Path, key: SigningKey) -> None:
    second = generate_key(tmp_path / "second")
    trust = TrustStore.from_public_keys([key.raw_public, second.raw_public], threshold=2)
    one = write_revision(tmp_path / "one", 3, [key, key])  # same key twice counts once
    with pytest.raises(UntrustedKeyError, match="1 trusted signature"):
        verify_revision_dir(one, trust)
    both = write_revision(tmp_path / "both", 3, [key, second])
    assert len(verify_revision_dir(both, trust).signed_by) == 2


def test_key_rotation(tmp_path: Path, key: SigningKey) -> None:
    new_key = generate_key(tmp_path / "new")
    device_trust = trust_of(key)  # version 0: the factory key

    # Rotation to the new key, signed by old and new: accepted with the revision.
    keyset = make_keyset([new_key.raw_public], version=1, threshold=1, signers=[key, new_key])
    rev = write_revision(tmp_path / "rev", 3, [new_key])
    (rev / KEYSET_FILE).write_bytes(keyset)
    verified = verify_revision_dir(rev, device_trust)
    assert verified.trust.version == 1
    assert set(verified.trust.keys) == {new_key.keyid}

    # After the rotation the old key alone no longer counts.
    old_signed = write_revision(tmp_path / "old", 4, [key])
    with pytest.raises(UntrustedKeyError):
        verify_revision_dir(old_signed, verified.trust)

    # A key set signed only by the new key (attacker with a stolen new key
    # but not the old one) is refused; so is one signed only by the old key.
    for signers in ([new_key], [key]):
        (rev / KEYSET_FILE).write_bytes(
            make_keyset([new_key.raw_public], version=1, threshold=1, signers=signers)
        )
        with pytest.raises(UntrustedKeyError):
            verify_revision_dir(rev, device_trust)

    # The set the device already has, shipped again, is no rotation: accepted as is.
    (rev / KEYSET_FILE).write_bytes(keyset)
    again = verify_revision_dir(rev, verified.trust)
    assert again.trust is verified.trust and again.rotated_keyset is None
    assert verified.rotated_keyset == keyset

    # Key sets only move forward: an older one, or another one of the same version.
    third = generate_key(tmp_path / "third")
    v2 = make_keyset([third.raw_public], version=2, threshold=1, signers=[new_key, third])
    (rev / KEYSET_FILE).write_bytes(v2)
    write_revision(tmp_path / "r5", 5, [third])
    (tmp_path / "r5" / KEYSET_FILE).write_bytes(v2)
    at_v2 = verify_revision_dir(tmp_path / "r5", verified.trust)
    assert at_v2.trust.version == 2
    (rev / KEYSET_FILE).write_bytes(keyset)
    with pytest.raises(RollbackError, match="key set version 1"):
        verify_revision_dir(rev, at_v2.trust)
    fork = make_keyset([key.raw_public], version=1, threshold=1, signers=[key, new_key])
    (rev / KEYSET_FILE).write_bytes(fork)
    with pytest.raises(RollbackError, match="key set version 1"):
        verify_revision_dir(rev, verified.trust)


def test_keyset_file_as_trust_root(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "keys.json"
    path.write_bytes(make_keyset([key.raw_public], version=1, threshold=1, signers=[key]))
    trust = TrustStore.from_files([path])
    assert trust.version == 1 and trust.threshold == 1
    rev = write_revision(tmp_path / "rev", 2, [key])
    verify_revision_dir(rev, trust)
    flip(path, 40)
    with pytest.raises(TrustError):
        TrustStore.from_files([path])


def test_non_canonical_keyset_is_refused(tmp_path: Path, key: SigningKey) -> None:
    """keys.json is kept in the device's trust root byte for byte: one spelling only,
    like state.json and state.sig.json (signed or not, other bytes are refused)."""
    new_key = generate_key(tmp_path / "new")
    keyset = make_keyset([new_key.raw_public], version=1, threshold=1, signers=[key, new_key])
    rev = write_revision(tmp_path / "rev", 3, [new_key])
    spellings = [
        json.dumps(json.loads(keyset), indent=1).encode(),  # whitespace
        keyset + b"\n",  # a trailing newline
        json.dumps(json.loads(keyset), sort_keys=False, separators=(",", ":"))
        .replace('"keyset":', '"keyset" :')
        .encode(),
    ]
    for data in spellings:
        assert data != keyset
        (rev / KEYSET_FILE).write_bytes(data)
        with pytest.raises(SignatureError, match=r"^keys\.json: not canonical JSON$"):
            verify_revision_dir(rev, trust_of(key))
        root = tmp_path / "root.json"
        root.write_bytes(data)
        with pytest.raises(SignatureError, match="not canonical"):
            TrustStore.from_files([root])
    (rev / KEYSET_FILE).write_bytes(keyset)
    assert verify_revision_dir(rev, trust_of(key)).trust.version == 1


def test_fleet_binding(tmp_path: Path, key: SigningKey) -> None:
    trust = trust_of(key)
    ours = write_revision(tmp_path / "ours", 3, [key], fleet="acme/gateway")
    theirs = write_revision(tmp_path / "theirs", 3, [key], fleet="other/product")
    none = write_revision(tmp_path / "none", 3, [key])

    def verify(rev: Path, fleet: str | None) -> int:
        state, sig, _ = read_revision_dir(rev)
        return verify_revision(state, sig, trust, objects=None, fleet=fleet).revision

    # bound: only its own fleet
    assert verify(ours, "acme/gateway") == 3
    with pytest.raises(FleetError, match="names fleet 'other/product'; this device is bound"):
        verify(theirs, "acme/gateway")
    with pytest.raises(FleetError, match=r"^revision 3 names no fleet; this device is bound to"):
        verify(none, "acme/gateway")
    # unbound: any
    assert verify(ours, None) == verify(theirs, None) == verify(none, None) == 3


def test_expiry_judged_at_the_time_floor(tmp_path: Path, key: SigningKey) -> None:
    """A board without a clock boots in 1970: expiry is judged at the later of the
    clock and the newest signed ``created`` the device verified."""
    trust = trust_of(key)
    expired = write_revision(tmp_path / "old", 3, [key], expires="2027-01-01T00:00:00Z")
    fresh = write_revision(tmp_path / "new", 4, [key], created="2027-06-01T00:00:00Z",
                           expires="2027-12-01T00:00:00Z")  # fmt: skip
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    floor = dt.datetime(2027, 6, 1, tzinfo=dt.UTC)

    def verify(rev: Path, now: dt.datetime, time_floor: dt.datetime | None) -> int:
        state, sig, _ = read_revision_dir(rev)
        return verify_revision(
            state, sig, trust, objects=None, now=now, time_floor=time_floor
        ).revision

    with pytest.raises(ExpiredError, match="expired at 2027-01-01"):
        verify(expired, epoch, floor)  # the clock set back does not revive it
    assert verify(fresh, epoch, floor) == 4  # nor refuse a fresh one
    with pytest.raises(ExpiredError):
        verify(fresh, dt.datetime(2028, 1, 1, tzinfo=dt.UTC), floor)  # a later clock counts
    assert trusted_now(epoch, floor) == floor and trusted_now(floor, None) == floor


def test_trust_root_on_disk(tmp_path: Path, key: SigningKey, key_dir: Path) -> None:
    """STORAGE/trust: the factory keys, then every rotated key set in version order,
    each checked against the keys before it; temp files are never read."""
    storage = tmp_path / "storage"
    with pytest.raises(DeviceError, match="no trusted keys"):
        load_trust(storage)
    (storage / "trust").mkdir(parents=True)
    (storage / "trust" / "00-pvpy.pub").write_bytes((key_dir / "pvpy.pub").read_bytes())
    (storage / "trust" / ".keys-v1-rev6.json.1234.tmp").write_bytes(b"half a file")
    assert set(load_trust(storage).keys) == {key.keyid}

    new_key, third = generate_key(tmp_path / "new"), generate_key(tmp_path / "third")
    v1 = make_keyset([new_key.raw_public], version=1, threshold=1, signers=[key, new_key])
    v2 = make_keyset([third.raw_public], version=2, threshold=1, signers=[new_key, third])
    (storage / "trust" / "keys-v2-rev9.json").write_bytes(v2)
    with pytest.raises(KeyFileError, match="not a rotation of the keys before it"):
        load_trust(storage)  # v2 is signed by keys the factory root never handed over to
    (storage / "trust" / "keys-v1-rev6.json").write_bytes(v1)
    root = load_trust_root(storage)
    assert set(root.current.keys) == {third.keyid} and root.current.version == 2
    for revision, signer in ((1, key), (5, key), (6, new_key), (8, new_key), (9, third)):
        assert set(root.keys_for_installed(revision).keys) == {signer.keyid}
