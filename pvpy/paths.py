"""Every path and socket of a device's storage and run directories, named once.

The storage (``STORAGE``, e.g. ``/storage`` on a board, any directory in the
sandbox) lives for years; the run directory (``RUN_DIR``, ``/run/pvpy`` on a
board) is emptied by every boot::

    STORAGE/objects/<sha256>          immutable objects (pvpy.store)
    STORAGE/trails/<rev>/             a revision: state.json, state.sig.json, boot.env
    STORAGE/trails/<rev>/disks/<name> revision-scoped writable layers and volumes
    STORAGE/disks/permanent/<name>    data that survives every update
    STORAGE/progress/<rev>.json       an update's record (pvpy.device.update)
    STORAGE/logs/<container>.log      container output, capped
    STORAGE/trust/NN-<file>           the factory's trusted keys (PEM files or key sets)
    STORAGE/trust/keys-v<V>-rev<R>.json  a key set rotated to by revision R (pvpy.trustroot)
    STORAGE/trust/fleet               the fleet this device is bound to
    STORAGE/trust/time-floor          the newest signed time verified (clockless boards)
    STORAGE/progress/refused.json     the last refusals of unverified input
    STORAGE/.device.lock              held by the device running this storage
    STORAGE/bootenv                   the sandbox's boot variables (file backend)
    STORAGE/config/api-token          the API's bearer token (0600)
    STORAGE/config/api-cert.pem       the API's TLS certificate and key
    STORAGE/config/api-key.pem
    STORAGE/config/pull.json          pull mode: registry reference and interval
    STORAGE/config/registry-auth      pull mode: user:password (0600)
    RUN_DIR/control.sock              PID 1's control socket (root only)
    RUN_DIR/api.sock                  the device API on a unix socket (root only)
    RUN_DIR/disks/<name>              boot-scoped writable layers

Standard library only (PID 1 imports it).
"""

from __future__ import annotations

from pathlib import Path

# -- the storage --
OBJECTS = "objects"
TRAILS = "trails"
DISKS = "disks"
PERMANENT = "permanent"
PROGRESS = "progress"
LOGS = "logs"
TRUST = "trust"
TRUST_FLEET = "fleet"  # in TRUST
TRUST_TIME_FLOOR = "time-floor"  # in TRUST
REFUSALS = "refused.json"  # in PROGRESS
BOOTENV = "bootenv"
CONFIG = "config"
API_TOKEN = f"{CONFIG}/api-token"
API_CERT = f"{CONFIG}/api-cert.pem"
API_KEY = f"{CONFIG}/api-key.pem"
PULL_CONFIG = f"{CONFIG}/pull.json"
REGISTRY_AUTH = f"{CONFIG}/registry-auth"
DEVICE_LOCK = ".device.lock"  # held by the device running this storage (its pid inside)
INSTALL_LOCK = ".install.lock"  # held while a revision is staged (pvpy.device.update)
PULL_LOCK = ".pull.lock"  # held by the one puller of a storage

# -- a revision directory (made by `pvpy state build`) and a trail --
STATE_FILE = "state.json"
SIGNATURE_FILE = "state.sig.json"
KEYSET_FILE = "keys.json"
TRAIL_BOOT_ENV = "boot.env"  # a trail's kernel and initrd names, for the boot script

# -- the run directory --
RUN_DIR = "/run/pvpy"
CONTROL_SOCKET = "control.sock"
API_SOCKET = "api.sock"
SANDBOX_RUN_ROOT = "/run/pvpy-sandbox"

# -- a board image --
BOARD_FILE = "/etc/pvpy/board.json"  # the device side of boards/<name>/board.yaml
MODULES_LOAD_LIST = "load.list"  # in /usr/lib/modules/<version>/: modules to load, in order


def sandbox_run_dir(storage: Path) -> Path:
    """A sandbox's RUN_DIR: on the host's /run, so host tools reach its sockets."""
    import hashlib  # on use: it maps OpenSSL (~3 MiB), which PID 1 never needs

    digest = hashlib.sha256(str(Path(storage).resolve()).encode()).hexdigest()[:12]
    return Path(SANDBOX_RUN_ROOT) / digest


def control_socket(run_dir: Path) -> Path:
    return Path(run_dir) / CONTROL_SOCKET


def api_socket(run_dir: Path) -> Path:
    return Path(run_dir) / API_SOCKET
