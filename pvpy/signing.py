"""Ed25519 keys, signature envelopes and signed key sets.

Crypto comes from ``cryptography``; its errors are translated here and
nowhere else. Keys never reach a log.

Files
-----
``pvpy.key``  private key, PKCS#8 PEM, mode 0600
``pvpy.pub``  public key, SubjectPublicKeyInfo PEM
``state.sig.json``  envelope over the exact bytes of state.json::

    {"#spec": "pvpy-signature@1",
     "signatures": [{"keyid": "<sha256 of raw public key>", "sig": "<base64>"}]}

``keys.json``  a signed key set, for key rotation (see ``KeySet``)::

    {"keyset": {"#spec": "pvpy-keyset@1", "version": 2, "threshold": 1,
                "keys": {"<keyid>": "<base64 raw public key>"}},
     "signatures": [...]}

Every signature covers a domain tag plus the payload, so a signature made
for a key set can never pass as one for a state, or the other way round.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pvpy.errors import KeyFileError, ManifestError, SignatureError, UntrustedKeyError
from pvpy.state import canonical

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

SIGNATURE_SPEC = "pvpy-signature@1"
KEYSET_SPEC = "pvpy-keyset@1"
DOMAIN_STATE = b"pvpy signed state v1\x00"
DOMAIN_KEYSET = b"pvpy signed keyset v1\x00"
MAX_ENVELOPE = 64 * 1024
MAX_SIGNATURES = 32

PRIVATE_KEY_FILE = "pvpy.key"
PUBLIC_KEY_FILE = "pvpy.pub"


def key_id(raw_public: bytes) -> str:
    """A key's id: sha256 (hex) of its 32 raw public bytes."""
    return hashlib.sha256(raw_public).hexdigest()


def _raw_public(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey = field(repr=False)

    @property
    def raw_public(self) -> bytes:
        return _raw_public(self.private.public_key())

    @property
    def keyid(self) -> str:
        return key_id(self.raw_public)

    def sign(self, domain: bytes, payload: bytes) -> dict[str, str]:
        sig = self.private.sign(domain + payload)
        return {"keyid": self.keyid, "sig": base64.b64encode(sig).decode()}


def generate_key(out_dir: Path) -> SigningKey:
    """Write a new key pair to ``out_dir``; refuses to overwrite. Raises KeyFileError."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out_dir.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out_dir / PRIVATE_KEY_FILE, out_dir / PUBLIC_KEY_FILE
    for p in (priv_path, pub_path):
        if p.exists():
            raise KeyFileError(f"{p} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv_pem)
    pub_path.write_bytes(pub_pem)
    return SigningKey(key)


def _key_path(path: Path, default_name: str) -> Path:
    return path / default_name if path.is_dir() else path


def load_signing_key(path: Path) -> SigningKey:
    """Load a private key file (or the pvpy.key in a directory). Raises KeyFileError."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = _key_path(Path(path), PRIVATE_KEY_FILE)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise KeyFileError(f"{path}: {e.strerror}") from e
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return SigningKey(key)


def load_public_key(path: Path) -> bytes:
    """Raw 32 public bytes from a PEM file (or the pvpy.pub in a directory)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = _key_path(Path(path), PUBLIC_KEY_FILE)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as e:
        raise KeyFileError(f"{path}: {e.strerror}") from e
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path}: not a PEM public key") from e
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return _raw_public(key)


def _verify_one(raw_public: bytes, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(raw_public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _parse_signatures(items: Any, where: str) -> list[tuple[str, bytes]]:
    if not isinstance(items, list) or not items:
        raise SignatureError(f"{where}: no signatures")
    if len(items) > MAX_SIGNATURES:
        raise SignatureError(f"{where}: more than {MAX_SIGNATURES} signatures")
    out = []
    for i, item in enumerate(items):
        if (
            not isinstance(item, dict)
            or set(item) != {"keyid", "sig"}
            or not isinstance(item["keyid"], str)
            or not isinstance(item["sig"], str)
        ):
            raise SignatureError(f"{where}: signatures[{i}] must be {{keyid, sig}} strings")
        try:
            sig = base64.b64decode(item["sig"], validate=True)
        except (binascii.Error, ValueError) as e:
            raise SignatureError(f"{where}: signatures[{i}].sig is not base64") from e
        # One text per signature: base64 ignores stray bits in the last digit.
        if base64.b64encode(sig).decode() != item["sig"]:
            raise SignatureError(f"{where}: signatures[{i}].sig is not canonical base64")
        out.append((item["keyid"], sig))
    return out


@dataclass(frozen=True)
class TrustStore:
    """The public keys a device trusts, and how many must sign (threshold).

    ``version`` is the key set's version (0 for keys given directly); it only
    goes up, through ``rotate``.
    """

    keys: dict[str, bytes]
    threshold: int = 1
    version: int = 0

    @classmethod
    def from_public_keys(cls, raw_keys: Iterable[bytes], threshold: int = 1) -> TrustStore:
        keys = {key_id(k): k for k in raw_keys}
        if not keys:
            raise KeyFileError("no trusted keys given")
        return cls(keys=keys, threshold=threshold)

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> TrustStore:
        """Trust from PEM public keys and/or a keys.json key set.

        A key set file is taken as is (a device's root of trust, provisioned
        at the factory); PEM files add plain keys with threshold 1.
        """
        raw: list[bytes] = []
        keyset: TrustStore | None = None
        for p in paths:
            p = Path(p)
            if p.suffix == ".json":
                try:
                    data = p.read_bytes()
                except OSError as e:
                    raise KeyFileError(f"{p}: {e.strerror}") from e
                doc = parse_keyset_unverified(data)
                keyset = TrustStore(doc.keys, doc.threshold, doc.version)
                # the root keyset must at least sign itself
                keyset.check_signed(DOMAIN_KEYSET, doc.payload, doc.signatures, str(p))
            else:
                raw.append(load_public_key(p))
        if keyset is not None:
            if raw:
                raise KeyFileError("give either a keys.json or PEM public keys, not both")
            return keyset
        return cls.from_public_keys(raw)

    def check_signed(
        self,
        domain: bytes,
        payload: bytes,
        signatures: list[tuple[str, bytes]],
        what: str,
    ) -> list[str]:
        """Return the trusted key ids whose signatures over ``payload`` are valid.

        Raises SignatureError when a trusted key's signature is bad,
        UntrustedKeyError when fewer than ``threshold`` trusted keys signed.
        """
        message = domain + payload
        good: list[str] = []
        unknown: list[str] = []
        for keyid, sig in signatures:
            raw = self.keys.get(keyid)
            if raw is None:
                unknown.append(keyid)
                continue
            if not _verify_one(raw, sig, message):
                raise SignatureError(f"{what}: bad signature by key {keyid[:16]}")
            if keyid not in good:
                good.append(keyid)
        if len(good) < self.threshold:
            if not good and unknown:
                raise UntrustedKeyError(
                    f"{what}: signed only by untrusted key(s) " + ", ".join(k[:16] for k in unknown)
                )
            raise UntrustedKeyError(
                f"{what}: {len(good)} trusted signature(s), {self.threshold} needed"
            )
        return good

    def rotate(self, keyset_bytes: bytes) -> TrustStore:
        """Move to a new key set, TUF-style (version N -> N+k).

        The new set must be signed by a threshold of the current keys AND by
        a threshold of its own keys, and its version must be higher. Returns
        the new TrustStore; raises TrustError otherwise.

        The key set already trusted (same version, keys and threshold) is no
        rotation: ``self`` comes back. Publishers keep shipping the newest
        keys.json with every revision, and a fleet holds devices that already
        rotated beside devices that have not.
        """
        doc = parse_keyset_unverified(keyset_bytes)
        if (doc.version, doc.keys, doc.threshold) == (self.version, self.keys, self.threshold):
            return self
        if doc.version <= self.version:
            from pvpy.errors import RollbackError

            raise RollbackError(
                f"key set version {doc.version} is not newer than trusted {self.version}"
            )
        self.check_signed(DOMAIN_KEYSET, doc.payload, doc.signatures, "keys.json (old keys)")
        new = TrustStore(doc.keys, doc.threshold, doc.version)
        new.check_signed(DOMAIN_KEYSET, doc.payload, doc.signatures, "keys.json (new keys)")
        return new


@dataclass(frozen=True)
class UnverifiedKeySet:
    keys: dict[str, bytes]
    threshold: int
    version: int
    payload: bytes
    signatures: list[tuple[str, bytes]]


def parse_keyset_unverified(data: bytes) -> UnverifiedKeySet:
    """Parse keys.json without checking any signature. Raises SignatureError."""
    if len(data) > MAX_ENVELOPE:
        raise SignatureError("keys.json too large")
    try:
        doc = canonical.decode(data)
    except ManifestError as e:
        raise SignatureError(f"keys.json: {e}") from e
    # One text per key set, as for states and envelopes: the bytes a device keeps
    # in its trust root are the bytes that were signed, not one of many spellings.
    if not canonical.is_canonical(data):
        raise SignatureError("keys.json: not canonical JSON")
    if not isinstance(doc, dict) or set(doc) != {"keyset", "signatures"}:
        raise SignatureError("keys.json: must have exactly 'keyset' and 'signatures'")
    ks = doc["keyset"]
    if (
        not isinstance(ks, dict)
        or ks.get("#spec") != KEYSET_SPEC
        or set(ks) - {"#spec", "version", "threshold", "keys"}
        or not isinstance(ks.get("version"), int)
        or not isinstance(ks.get("threshold"), int)
        or not isinstance(ks.get("keys"), dict)
    ):
        raise SignatureError(
            f"keys.json: keyset must be a {KEYSET_SPEC} with version, threshold, keys"
        )
    keys: dict[str, bytes] = {}
    for keyid, b64 in ks["keys"].items():
        try:
            raw = base64.b64decode(b64, validate=True) if isinstance(b64, str) else b""
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32 or key_id(raw) != keyid:
            raise SignatureError(f"keys.json: key {str(keyid)[:16]} is malformed")
        keys[keyid] = raw
    if not 1 <= ks["threshold"] <= max(len(keys), 1) or not keys:
        raise SignatureError("keys.json: threshold must be between 1 and the number of keys")
    if ks["version"] < 1:
        raise SignatureError("keys.json: version must be >= 1")
    return UnverifiedKeySet(
        keys=keys,
        threshold=ks["threshold"],
        version=ks["version"],
        payload=canonical.encode(ks),
        signatures=_parse_signatures(doc["signatures"], "keys.json"),
    )


def make_keyset(
    public_keys: Iterable[bytes],
    version: int,
    threshold: int,
    signers: Iterable[SigningKey],
) -> bytes:
    """A signed keys.json. For a rotation, ``signers`` must hold a threshold of
    the old keys and of the new ones."""
    ks = {
        "#spec": KEYSET_SPEC,
        "version": version,
        "threshold": threshold,
        "keys": {key_id(k): base64.b64encode(k).decode() for k in public_keys},
    }
    payload = canonical.encode(ks)
    sigs = [s.sign(DOMAIN_KEYSET, payload) for s in signers]
    return canonical.encode({"keyset": ks, "signatures": sigs})


def sign_state(state_bytes: bytes, keys: Iterable[SigningKey]) -> bytes:
    """The state.sig.json envelope for ``state_bytes``."""
    sigs = [k.sign(DOMAIN_STATE, state_bytes) for k in keys]
    return canonical.encode({"#spec": SIGNATURE_SPEC, "signatures": sigs})


def parse_envelope_unverified(data: bytes) -> list[tuple[str, bytes]]:
    """The (keyid, signature) pairs of a state.sig.json. Raises SignatureError."""
    if len(data) > MAX_ENVELOPE:
        raise SignatureError("state.sig.json too large")
    try:
        doc = canonical.decode(data)
    except ManifestError as e:
        raise SignatureError(f"state.sig.json: {e.reason}") from e
    if canonical.encode(doc) != data:
        raise SignatureError("state.sig.json: not canonical JSON")
    if (
        not isinstance(doc, dict)
        or doc.get("#spec") != SIGNATURE_SPEC
        or set(doc)
        != {
            "#spec",
            "signatures",
        }
    ):
        raise SignatureError(f"state.sig.json: not a {SIGNATURE_SPEC} envelope")
    return _parse_signatures(doc["signatures"], "state.sig.json")
