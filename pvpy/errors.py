"""The one exception tree of pvpy.

Every error pvpy raises on purpose is a ``PvpyError``; anything else is a bug.
The CLI maps each branch to an exit code and a one-line message (``exit_code``),
the device API will map them to HTTP statuses.

::

    PvpyError                       exit 1
     ├── UsageError                 exit 2   bad command line / arguments
     ├── ManifestError              exit 4   state or spec fails the schema
     │    └── SpecError                      a build spec cannot be built
     ├── TrustError                 exit 3   a revision must not be trusted
     │    ├── SignatureError                 missing, malformed or bad signature
     │    ├── UntrustedKeyError              signed, but by no trusted key
     │    ├── RollbackError                  revision not newer than current
     │    └── ExpiredError                   metadata past its expiry
     ├── StoreError                 exit 5   storage / object store
     │    ├── ObjectNameError                not a sha256 name
     │    ├── ObjectMissingError
     │    └── ObjectCorruptError             bytes do not hash to the name
     ├── KeyFileError               exit 6   key file unreadable / wrong kind
     ├── CommandError               exit 7   an outside program failed
     ├── BootEnvError               exit 8   boot environment unreadable/unwritable
     ├── ContainerError             exit 9   a container cannot be set up or run
     ├── DeviceError                exit 10  the device (or sandbox) cannot do that
     └── RegistryError              exit 11  an OCI registry unreachable or refusing
"""

from __future__ import annotations


class PvpyError(Exception):
    """Base of every error pvpy raises on purpose."""

    exit_code = 1


class UsageError(PvpyError):
    exit_code = 2


class ManifestError(PvpyError):
    """A state manifest (or spec) is malformed.

    ``path`` is the JSON path of the offending value ("$" for the document).
    """

    exit_code = 4

    def __init__(self, reason: str, path: str = "$") -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}")


class SpecError(ManifestError):
    """A build spec names something that cannot be built (missing dir, bad tarball)."""


class TrustError(PvpyError):
    exit_code = 3


class SignatureError(TrustError):
    pass


class UntrustedKeyError(TrustError):
    pass


class RollbackError(TrustError):
    pass


class ExpiredError(TrustError):
    pass


class StoreError(PvpyError):
    exit_code = 5


class ObjectNameError(StoreError):
    pass


class ObjectMissingError(StoreError):
    pass


class ObjectCorruptError(StoreError):
    pass


class KeyFileError(PvpyError):
    exit_code = 6


class CommandError(PvpyError):
    """An outside program (crun, mksquashfs, ...) failed.

    Carries the argv, the exit code and the tail of stderr.
    """

    exit_code = 7

    def __init__(self, argv: list[str], returncode: int, stderr: str = "") -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        msg = f"{argv[0]} exited with {returncode}"
        if tail:
            msg += f": {tail}"
        super().__init__(msg)


class BootEnvError(PvpyError):
    """The boot environment cannot be read or written (message names the backend)."""

    exit_code = 8


class ContainerError(PvpyError):
    """A container's bundle, mounts or runtime failed (message names the container)."""

    exit_code = 9


class DeviceError(PvpyError):
    """A device-level request cannot be done (not provisioned, not root, ...)."""

    exit_code = 10


class RegistryError(PvpyError):
    """An OCI registry cannot be reached, or refused a request (``status`` 0: unreachable)."""

    exit_code = 11

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status
