"""A new device's storage: the factory revision, the trusted keys, the first boot
variables and the API token.

Shared: ``pvpy device provision`` runs it on a storage directory (the sandbox),
``pvpy image build`` on the storage partition of a board image. The revision is
verified first (``pvpy.trust``), exactly as the device verifies an update.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pvpy import bootvars, paths
from pvpy.errors import DeviceError
from pvpy.log import get_logger
from pvpy.store import Storage, write_atomic

log = get_logger("provision")


def provision(storage_dir: Path, signed_dir: Path, trust_files: list[Path]) -> int:
    """Install the factory revision: verify it, copy its objects, set pv_rev.

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
    # The sandbox's boot variables (the file backend's format); a board image
    # writes its bootloader's own besides.
    first = bootvars.render({bootvars.REV: str(verified.revision)})
    write_atomic(storage.root / paths.BOOTENV, first.encode())
    make_api_token(storage.root)
    log.info("provisioned", revision=verified.revision, storage=str(storage_dir))
    return verified.revision


def make_api_token(storage: Path) -> Path:
    """The device's API bearer token (STORAGE/config/api-token, 0600), made once."""
    import secrets

    path = Path(storage) / paths.API_TOKEN
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            # hex: a token must survive `--token TOKEN` (urlsafe ones may start with "-")
            f.write(secrets.token_hex(24) + "\n")
    return path
