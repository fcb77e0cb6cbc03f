"""The one exception tree of pvpy, and the one table that says what each error means.

Every error pvpy raises on purpose is a ``PvpyError``; anything else is a bug
(the CLI exits 70, the API answers 500 "internal"). ``ERRORS`` below gives each
branch its exit code (the CLI), its HTTP status and its ``kind`` (the device
API's ``{"error", "kind"}`` replies); ``exit_code()`` and ``http_status()`` read
it and nothing else maps errors. ``PvpyError.exit_code`` is ``exit_code(self)``.

::

    PvpyError                       exit 1   500 internal
     ├── UsageError                 exit 2   400 usage     bad command line / arguments
     ├── ManifestError              exit 4   422 manifest  state or spec fails the schema
     │    └── SpecError                                    a build spec cannot be built
     ├── TrustError                 exit 3   403 trust     a revision must not be trusted
     │    ├── SignatureError                               missing, malformed or bad signature
     │    ├── UntrustedKeyError                            signed, but by no trusted key
     │    ├── RollbackError                  409           revision not newer than current
     │    ├── ExpiredError                                 metadata past its expiry
     │    └── FleetError                                   a revision of another fleet
     ├── StoreError                 exit 5   500 store     storage / object store
     │    ├── ObjectNameError                400           not a sha256 name
     │    ├── ObjectMissingError             409
     │    └── ObjectCorruptError             422           bytes do not hash to the name
     ├── KeyFileError               exit 6   500 device    key file unreadable / wrong kind
     ├── CommandError               exit 7   500 device    an outside program failed
     ├── BootEnvError               exit 8   500 device    boot environment unreadable/unwritable
     ├── ContainerError             exit 9   409 device    a container cannot be set up or run
     ├── DeviceError                exit 10  409 device    the device (or sandbox) cannot do that
     ├── RegistryError              exit 11  500 internal  an OCI registry unreachable or refusing
     └── HttpError                  its own status and kind; exit by kind (``exit_code_of_kind``)
          ├── ApiError                                     the device API refuses a request
          └── RemoteError                                  the device API refused, or is unreachable

``HttpError``s carry the status and kind of one HTTP answer: ``ApiError`` is the
server's refusal before any pvpy error (bad body, no token, 503 busy);
``RemoteError`` is what the workstation client got back, so a refusal by a
device exits as the same refusal would locally (kind trust: 3, store: 5...).

Standard library only (PID 1 imports it).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: PID 1 imports this
if TYPE_CHECKING:
    from typing import Any

EXIT_INTERNAL = 70  # a bug: an exception that is not a PvpyError (sysexits' EX_SOFTWARE)


class PvpyError(Exception):
    """Base of every error pvpy raises on purpose."""

    @property
    def exit_code(self) -> int:
        return exit_code(self)


class UsageError(PvpyError):
    pass


class ManifestError(PvpyError):
    """A state manifest (or spec) is malformed.

    ``path`` is the JSON path of the offending value ("$" for the document).
    """

    def __init__(self, reason: str, path: str = "$") -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}")


class SpecError(ManifestError):
    """A build spec names something that cannot be built (missing dir, bad tarball)."""


class TrustError(PvpyError):
    pass


class SignatureError(TrustError):
    pass


class UntrustedKeyError(TrustError):
    pass


class RollbackError(TrustError):
    pass


class ExpiredError(TrustError):
    pass


class FleetError(TrustError):
    """A revision names another fleet (or none) than the one the device is bound to."""


class StoreError(PvpyError):
    pass


class ObjectNameError(StoreError):
    pass


class ObjectMissingError(StoreError):
    pass


class ObjectCorruptError(StoreError):
    pass


class KeyFileError(PvpyError):
    pass


class CommandError(PvpyError):
    """An outside program (crun, mksquashfs, ...) failed.

    Carries the argv, the exit code and the tail of stderr.
    """

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


class ContainerError(PvpyError):
    """A container's bundle, mounts or runtime failed (message names the container)."""


class DeviceError(PvpyError):
    """A device-level request cannot be done (not provisioned, not root, ...)."""


class RegistryError(PvpyError):
    """An OCI registry cannot be reached, or refused a request (``status`` 0: unreachable)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class HttpError(PvpyError):
    """One HTTP answer's error: its ``status`` and ``kind`` are its own, not the table's."""

    def __init__(self, message: str, status: int, kind: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


class ApiError(HttpError):
    """The device API refuses a request at the HTTP level: status, one-line reason,
    extra JSON fields for the reply (e.g. ``allowed`` with a 405)."""

    def __init__(self, status: int, reason: str, kind: str = "http", **extra: Any) -> None:
        super().__init__(reason, status, kind)
        self.reason = reason
        self.extra = extra


UNREACHABLE = "unreachable"  # RemoteError's kind when no device answered (status 0)


class RemoteError(HttpError):
    """The device answered with an error, or could not be reached (status 0).

    ``refused``: the device refused a pushed revision (whatever the kind, the
    push exits as a refusal: ``EXIT_REFUSED``).
    """

    def __init__(
        self, message: str, status: int = 0, kind: str = UNREACHABLE, refused: bool = False
    ) -> None:
        super().__init__(message, status, kind)
        self.refused = refused


# -- the one table -----------------------------------------------------------------------

# class, exit code (CLI), HTTP status and kind (API). The first row the error is an
# instance of answers, so the most specific come first. HttpErrors are not rows: they
# carry their own status and kind (see exit_code_of_kind).
ERRORS: tuple[tuple[type[PvpyError], int, int, str], ...] = (
    (UsageError, 2, 400, "usage"),
    (ObjectNameError, 5, 400, "store"),
    (ObjectMissingError, 5, 409, "store"),
    (ObjectCorruptError, 5, 422, "store"),
    (StoreError, 5, 500, "store"),
    (RollbackError, 3, 409, "trust"),
    (TrustError, 3, 403, "trust"),
    (ManifestError, 4, 422, "manifest"),
    (KeyFileError, 6, 500, "device"),
    (CommandError, 7, 500, "device"),
    (BootEnvError, 8, 500, "device"),
    (ContainerError, 9, 409, "device"),
    (DeviceError, 10, 409, "device"),
    (RegistryError, 11, 500, "internal"),  # the API talks to no registry: never answered
    (PvpyError, 1, 500, "internal"),
)

# A kind's exit code is its most general class's (the last row with that kind): a
# device's "store" refusal exits 5 like a local StoreError, any "device" one 10.
_EXIT_BY_KIND = {kind: code for _, code, _, kind in ERRORS}
# Kinds no class of ours has: a refused token and no answer are the device's doing.
_EXIT_BY_KIND["auth"] = _EXIT_BY_KIND[UNREACHABLE] = _EXIT_BY_KIND["device"]
_EXIT_BY_KIND["http"] = _EXIT_BY_KIND["internal"]

EXIT_REFUSED = _EXIT_BY_KIND["trust"]  # a revision refused or failed (WONTGO, ERROR)


def exit_code_of_kind(kind: str) -> int:
    """The exit code a local command gives for an error of the API's ``kind``."""
    return _EXIT_BY_KIND.get(kind, _EXIT_BY_KIND["internal"])


def exit_code(error: BaseException) -> int:
    """The CLI's exit code for ``error``: from ``ERRORS``; 70 for a bug."""
    if isinstance(error, RemoteError) and error.refused:
        return EXIT_REFUSED
    if isinstance(error, HttpError):
        return exit_code_of_kind(error.kind)
    for cls, code, _, _ in ERRORS:
        if isinstance(error, cls):
            return code
    return EXIT_INTERNAL


def http_status(error: BaseException) -> tuple[int, str]:
    """The API's HTTP status and kind for ``error``: from ``ERRORS``; 500 "internal"
    for a bug."""
    if isinstance(error, HttpError):
        return error.status, error.kind
    for cls, _, status, kind in ERRORS:
        if isinstance(error, cls):
            return status, kind
    return 500, "internal"


def one_line(text: str, limit: int = 300) -> str:
    """``text`` as one line of at most ``limit`` characters: how an error's reason
    travels (an API reply, a registry's or PID 1's refusal, a CLI message)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
