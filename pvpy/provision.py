"""A new device's storage: the factory revision, the trusted keys, the first boot
variables and the API credentials (a bearer token, and a private key and a
self-signed certificate for TLS, pinned by its fingerprint in the credentials file).

Shared: ``pvpy device provision`` runs it on a storage directory (the sandbox),
``pvpy image build`` on the storage partition of a board image. The revision is
verified first (``pvpy.trust``), exactly as the device verifies an update.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pvpy import bootvars, paths, trustroot
from pvpy.errors import DeviceError, StoreError
from pvpy.log import get_logger
from pvpy.store import Storage, write_atomic

log = get_logger("provision")


def provision(
    storage_dir: Path, signed_dir: Path, trust_files: list[Path], device_name: str = "pvpy"
) -> int:
    """Install the factory revision: verify it, copy its objects, set pv_rev; make
    the API credentials (``make_api_credentials``, ``device_name`` in the certificate).

    Refuses a storage that already holds a revision. Returns the revision.
    """
    from pvpy.signing import TrustStore
    from pvpy.trust import verify_revision_dir

    storage = Storage(Path(storage_dir))
    if storage.revisions():
        raise DeviceError(f"{storage_dir} already holds revisions {storage.revisions()}")
    trust = TrustStore.from_files(trust_files)
    verified = verify_revision_dir(Path(signed_dir), trust)
    storage.ensure()
    src = Path(signed_dir) / paths.OBJECTS
    for ref in verified.state.objects().values():
        storage.objects.put_file(src / ref.sha256, expected=ref.sha256)
    trust_dir = storage.root / paths.TRUST
    trust_dir.mkdir(exist_ok=True)
    for i, path in enumerate(trust_files):
        shutil.copyfile(path, trust_dir / f"{i:02d}-{Path(path).name}")
    storage.install_revision(verified.revision, verified.state_bytes, verified.signature_bytes)
    # What the factory revision proves (a key set it ships, its fleet, its time) is
    # part of the trust root from the first boot on, as for any installed revision.
    trustroot.record_verified(storage.root, verified)
    # The sandbox's boot variables (the file backend's format); a board image
    # writes its bootloader's own besides.
    first = bootvars.render({bootvars.REV: str(verified.revision)})
    write_atomic(storage.root / paths.BOOTENV, first.encode())
    make_api_credentials(storage.root, device_name)
    log.info("provisioned", revision=verified.revision, storage=str(storage_dir))
    return verified.revision


def make_api_credentials(storage: Path, device_name: str = "pvpy") -> Path:
    """The device's API credentials, each part made once (so this is safe to run again):
    a TLS private key (STORAGE/config/api-key.pem, 0600) and a self-signed certificate
    for it (api-cert.pem), and the credentials file (api-token, 0600): a bearer token
    and the certificate's sha256, which clients pin (``pvpy.api_credentials``).

    A token-only file (made before TLS) keeps its token and gains the pin. Returns
    the credentials file. Raises StoreError, or UsageError for an unreadable token file.
    """
    from pvpy.api_credentials import ApiCredentials, read_credentials

    pin = make_api_tls(storage, device_name)
    creds_path = Path(storage) / paths.API_TOKEN
    if creds_path.exists():
        current = read_credentials(creds_path)
        if current.tls_sha256 == pin:
            return creds_path
        token = current.token
    else:
        import secrets

        # hex: a token must survive `--token TOKEN` (urlsafe ones may start with "-")
        token = secrets.token_hex(24)
    write_atomic(creds_path, ApiCredentials(token, pin).render(), mode=0o600)
    return creds_path


def make_api_tls(storage: Path, device_name: str = "pvpy") -> str:
    """The device's TLS key (STORAGE/config/api-key.pem, 0600) and self-signed
    certificate (api-cert.pem), made unless both exist. Returns the certificate's
    sha256 (what clients pin). Raises StoreError."""
    from pvpy.api_credentials import certificate_sha256

    root = Path(storage)
    key_path, cert_path = root / paths.API_KEY, root / paths.API_CERT
    if not (key_path.is_file() and cert_path.is_file()):
        (root / paths.CONFIG).mkdir(parents=True, exist_ok=True)
        key_pem, cert_pem = _self_signed(device_name)
        write_atomic(key_path, key_pem, mode=0o600)  # the key first: a cert never lacks its key
        write_atomic(cert_path, cert_pem)
        log.info("api certificate made", sha256=certificate_sha256(cert_pem))
    try:
        return certificate_sha256(cert_path.read_bytes())
    except (OSError, ValueError) as e:
        raise StoreError(f"{cert_path}: not a readable PEM certificate") from e


def _self_signed(device_name: str) -> tuple[bytes, bytes]:
    """An ECDSA P-256 key and a self-signed certificate for it, PEM (P-256: every TLS
    client takes it; Ed25519 certificates are refused by many). Clients pin the
    certificate, so its dates only need to hold any clock (a board may boot in 1970)
    and its names are for tools that check them."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_name)])
    names: list[x509.GeneralName] = [x509.DNSName(device_name), x509.DNSName("localhost"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                     x509.IPAddress(ipaddress.ip_address("::1"))]  # fmt: skip
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime(1970, 1, 2, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC))  # RFC 5280 4.1.2.5
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)
