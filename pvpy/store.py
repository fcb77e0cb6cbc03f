"""Content-addressed object store and revision trails, crash-safe.

Layout of a storage root (the device's /storage, or a workstation revision dir)::

    objects/<sha256>          immutable blobs, named by the sha256 of their bytes
    objects/.tmp/             writes in flight; never read, emptied by clean_temp()
    objects/.partial/<sha256> a download so far (resumable); hashed whole before use
    trails/<rev>/state.json   a revision's signed state (+ state.sig.json)
    trails/<rev>/boot.env     its BSP objects for the boot script (pv_kernel=<sha256>, ...)

Every write goes to a temp file in the same filesystem, is fsynced, renamed
into place and its directory fsynced: after a power cut a name either points
to complete bytes or does not exist. An object is trusted only after its hash
was checked (``verify``/``read_verified``); a name that is not 64 lowercase hex
digits is refused before it reaches the filesystem, so no path traversal.

Raises StoreError subclasses; OSError is translated here and nowhere else. The module
is longer than 500 lines because of that: every layout on disk lives here (objects,
partial downloads, trails).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from pvpy import paths
from pvpy._record import Record
from pvpy.errors import (
    ObjectCorruptError,
    ObjectMissingError,
    ObjectNameError,
    StoreError,
)

# Named once, in pvpy.paths; re-exported for the callers that already read them here
# (`from pvpy.store import STATE_FILE`).
from pvpy.paths import SIGNATURE_FILE as SIGNATURE_FILE
from pvpy.paths import STATE_FILE as STATE_FILE

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from typing import Any, BinaryIO

CHUNK = 1 << 20


def _token(nbytes: int = 4) -> str:
    return os.urandom(nbytes).hex()


def remove_tree(path: str | Path) -> None:
    """``rm -rf path``, best effort: symlinks are removed, never followed (a link at
    ``path`` itself included). Not shutil.rmtree: PID 1 runs this at every container
    start (work dirs) and GC, and shutil brings bz2 and lzma (~0.5 MiB)."""
    if os.path.islink(path):
        with contextlib.suppress(OSError):
            os.unlink(path)
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(root, name))
        for name in dirs:
            entry = os.path.join(root, name)
            with contextlib.suppress(OSError):
                if os.path.islink(entry):
                    os.unlink(entry)
                else:
                    os.rmdir(entry)
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _sha256() -> Any:  # hashlib's type, imported lazily
    # Imported on use: hashlib maps OpenSSL (~3 MB), which PID 1 never needs.
    import hashlib

    return hashlib.sha256()


_SHA256 = re.compile(r"[0-9a-f]{64}")  # always fullmatch: "$" would take a trailing newline

Progress = Callable[[int], None]


def check_name(name: str) -> str:
    """Return ``name`` if it is a sha256 hex digest, else raise ObjectNameError."""
    if not isinstance(name, str) or not _SHA256.fullmatch(name):
        shown = repr(name)[:80]
        raise ObjectNameError(f"not an object name (64 lowercase hex digits): {shown}")
    return name


def _os_error(what: str, e: OSError) -> StoreError:
    if e.errno == errno.ENOSPC:
        return StoreError(f"{what}: no space left on device")
    return StoreError(f"{what}: {e.strerror or e}")


def _mark_in_flight(fd: int) -> None:
    """Mark a temp file as being written: an flock held until its writer closes it
    (or dies), so ``clean_temp`` in another process leaves it alone."""
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX)


def _in_flight(path: str) -> bool:
    """True when a writer holds the temp file's flock (``_mark_in_flight``)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # a symlink, or gone: no writer of ours
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a power cut leaves old or new, never half.

    Raises StoreError.
    """
    tmp = path.with_name(f".{path.name}.{_token()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _os_error(f"write {path}", e) from e


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    digest = _sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return str(digest.hexdigest())


def _sha256_bytes(data: bytes) -> str:
    digest = _sha256()
    digest.update(data)
    return str(digest.hexdigest())


class ObjectStore:
    """sha256-addressed blobs in one directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / ".tmp"

    def ensure(self) -> ObjectStore:
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _os_error(f"create {self.root}", e) from e
        return self

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def has(self, name: str) -> bool:
        """True when an object of that name is stored (its bytes not re-hashed)."""
        return self.path(name).is_file()

    def size(self, name: str) -> int:
        try:
            return self.path(name).stat().st_size
        except FileNotFoundError as e:
            raise ObjectMissingError(f"object {name} is missing") from e

    def names(self) -> Iterator[str]:
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for entry in entries:
            if _SHA256.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                yield entry.name

    def put_stream(
        self,
        stream: BinaryIO,
        expected: str | None = None,
        max_size: int | None = None,
        progress: Progress | None = None,
    ) -> str:
        """Store the bytes of ``stream``; return their sha256.

        With ``expected``, bytes that hash to anything else are dropped and
        ObjectCorruptError raised; with ``max_size``, more bytes than that
        abort the write. Nothing is visible under an object name until all its
        bytes are on disk.
        """
        if expected is not None:
            check_name(expected)
        self.ensure()
        tmp = self.tmp / _token(16)
        digest = _sha256()
        written = 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
            try:
                _mark_in_flight(fd)
                while chunk := stream.read(CHUNK):
                    written += len(chunk)
                    if max_size is not None and written > max_size:
                        raise ObjectCorruptError(
                            f"object larger than the expected {max_size} bytes"
                        )
                    digest.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                    if progress:
                        progress(len(chunk))
                os.fsync(fd)
            finally:
                os.close(fd)
            name: str = digest.hexdigest()
            if expected is not None and name != expected:
                raise ObjectCorruptError(f"object bytes hash to {name}, not {expected}")
            final = self.root / name
            if final.is_file():
                tmp.unlink()  # same content already stored
            else:
                os.replace(tmp, final)
                fsync_dir(self.root)
            return name
        except OSError as e:
            raise _os_error("store object", e) from e
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def put_file(self, path: Path, expected: str | None = None) -> str:
        try:
            with open(path, "rb") as f:
                return self.put_stream(f, expected=expected)
        except FileNotFoundError as e:
            raise StoreError(f"{path}: no such file") from e

    def put_bytes(self, data: bytes, expected: str | None = None) -> str:
        import io

        return self.put_stream(io.BytesIO(data), expected=expected)

    def verify(self, name: str, size: int | None = None) -> None:
        """Re-hash a stored object. Raises ObjectMissingError / ObjectCorruptError."""
        path = self.path(name)
        try:
            if size is not None and path.stat().st_size != size:
                raise ObjectCorruptError(
                    f"object {name} has {path.stat().st_size} bytes, expected {size}"
                )
            actual = sha256_file(path)
        except FileNotFoundError as e:
            raise ObjectMissingError(f"object {name} is missing") from e
        except OSError as e:
            raise _os_error(f"read object {name}", e) from e
        if actual != name:
            raise ObjectCorruptError(f"object {name} is corrupt (its bytes hash to {actual})")

    def read_verified(self, name: str) -> bytes:
        """Whole object bytes, after checking their hash (small objects only)."""
        try:
            data = self.path(name).read_bytes()
        except FileNotFoundError as e:
            raise ObjectMissingError(f"object {name} is missing") from e
        except OSError as e:
            raise _os_error(f"read object {name}", e) from e
        if _sha256_bytes(data) != name:
            raise ObjectCorruptError(f"object {name} is corrupt")
        return data

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(name).unlink()

    def clean_temp(self) -> int:
        """Drop writes a crash left behind, never one in flight in another process
        (``_mark_in_flight``: an API upload, a pull). Returns how many."""
        count = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.tmp):
                with contextlib.suppress(OSError):
                    if _in_flight(entry.path):
                        continue
                    os.unlink(entry.path)
                    count += 1
        return count

    # Partial downloads (the registry puller): objects/.partial/<sha256>, the bytes of an
    # object received so far, kept across restarts so a transfer resumes where it
    # stopped (HTTP Range). Never read as an object: only ``adopt_partial`` makes one,
    # after hashing it whole. Not touched by clean_temp; ``drop_partials`` bounds them.

    def partial_path(self, name: str) -> Path:
        return self.root / ".partial" / check_name(name)

    def partial_size(self, name: str) -> int:
        """Bytes of ``name`` already received (0: none)."""
        try:
            return self.partial_path(name).stat().st_size
        except OSError:
            return 0

    def append_partial(self, name: str, stream: BinaryIO, offset: int, max_size: int) -> int:
        """Write ``stream`` into the partial of ``name`` from byte ``offset`` (what was
        there beyond it is dropped) until the stream ends; what arrived is kept (fsynced)
        even when reading fails. Returns the partial's size. Raises StoreError (disk
        full; ObjectCorruptError past ``max_size``); the stream's own errors pass through."""
        path = self.partial_path(name)
        written = offset
        try:
            path.parent.mkdir(exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                os.ftruncate(fd, offset)
                os.lseek(fd, offset, os.SEEK_SET)
                try:
                    while chunk := stream.read(CHUNK):
                        if written + len(chunk) > max_size:
                            raise ObjectCorruptError(
                                f"object larger than the expected {max_size} bytes"
                            )
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view) :]
                        written += len(chunk)
                finally:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise _os_error("store object", e) from e
        return written

    def adopt_partial(self, name: str, size: int) -> None:
        """A complete partial becomes the object ``name`` once it hashes to it; else it
        is removed and ObjectCorruptError raised. Raises StoreError."""
        path = self.partial_path(name)
        try:
            actual = self.partial_size(name)
            got = sha256_file(path) if actual == size else None
            if got != name:
                path.unlink()
                what = f"hash to {got}" if got else f"are {actual} bytes, not {size}"
                raise ObjectCorruptError(f"object {name}: the bytes received {what}")
            os.replace(path, self.root / name)
            fsync_dir(self.root)
        except FileNotFoundError as e:
            raise ObjectMissingError(f"object {name}: nothing received") from e
        except OSError as e:
            raise _os_error("store object", e) from e

    def drop_partials(self, keep: Iterable[str] = ()) -> None:
        """Remove the partial downloads not named in ``keep``."""
        wanted = set(keep)
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root / ".partial"):
                if entry.name not in wanted:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    def gc(self, keep: Iterable[str]) -> list[str]:
        """Remove every object not in ``keep``; return the removed names."""
        keep_set = set(keep)
        removed = [n for n in self.names() if n not in keep_set]
        for name in removed:
            self.remove(name)
        if removed:
            fsync_dir(self.root)
        return removed


def referenced_objects(doc: Any) -> set[str]:
    """Every sha256 a state document names, found by walking it.

    Walks the raw JSON rather than the model so that GC stays conservative
    even for a state this version of pvpy cannot fully parse.
    """
    found: set[str] = set()
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            value = item.get("sha256")
            if isinstance(value, str) and _SHA256.fullmatch(value):
                found.add(value)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


class GcResult(Record):
    removed_objects: list[str]
    removed_revisions: list[int]
    freed_bytes: int


BOOT_ENV_FILE = paths.TRAIL_BOOT_ENV


def boot_env(state: bytes) -> bytes | None:
    """The boot script's view of a revision: ``pv_kernel``, ``pv_initrd``, ``pv_fdt``
    (object names) and ``pv_cmdline``, as U-Boot's ``env import -t`` reads them.

    None when the state names no kernel and initrd (the bootloader then has
    nothing to load for it). U-Boot cannot hash (no sha256 command in Debian's
    build), so it trusts these names because pvpy verified the objects first.
    """
    import json

    try:
        bsp = json.loads(state).get("bsp") or {}
        lines = [f"pv_kernel={bsp['kernel']['sha256']}", f"pv_initrd={bsp['initrd']['sha256']}"]
    except (ValueError, AttributeError, KeyError, TypeError):
        return None
    if isinstance(bsp.get("dtb"), dict):
        lines.append(f"pv_fdt={bsp['dtb']['sha256']}")
    lines.append(f"pv_cmdline={' '.join(str(bsp.get('cmdline', '')).split())}")
    return ("\n".join(lines) + "\n").encode()


class Storage:
    """A device's storage: objects plus one trail per installed revision."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.objects = ObjectStore(self.root / paths.OBJECTS)
        self.trails = self.root / paths.TRAILS

    def ensure(self) -> Storage:
        self.objects.ensure()
        try:
            self.trails.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _os_error(f"create {self.trails}", e) from e
        return self

    def trail(self, revision: int) -> Path:
        if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
            raise StoreError(f"not a revision number: {revision!r}")
        return self.trails / str(revision)

    def revisions(self) -> list[int]:
        try:
            names = os.listdir(self.trails)
        except FileNotFoundError:
            return []
        return sorted(
            int(n) for n in names if n.isdigit() and (self.trails / n / STATE_FILE).is_file()
        )

    def has_revision(self, revision: int) -> bool:
        return (self.trail(revision) / STATE_FILE).is_file()

    def install_revision(self, revision: int, state: bytes, signature: bytes) -> Path:
        """Write a revision's trail atomically: all its files appear at once.

        Built in a temp dir, fsynced, renamed to trails/<rev>. Refuses to
        replace an existing trail (revisions are immutable). A state with a
        kernel and initrd also gets its ``boot.env`` (see ``boot_env``): the
        caller passes verified bytes, so factory installs and updates alike
        hand the bootloader only verified object names.
        """
        self.ensure()
        final = self.trail(revision)
        if final.exists():
            raise StoreError(f"revision {revision} is already installed")
        tmp = self.trails / f".tmp-{revision}-{_token()}"
        try:
            tmp.mkdir()
            write_atomic(tmp / STATE_FILE, state)
            write_atomic(tmp / SIGNATURE_FILE, signature)
            if (boot := boot_env(state)) is not None:
                write_atomic(tmp / BOOT_ENV_FILE, boot)
            os.rename(tmp, final)
            fsync_dir(self.trails)
        except OSError as e:
            remove_tree(tmp)
            raise _os_error(f"install revision {revision}", e) from e
        except StoreError:
            remove_tree(tmp)
            raise
        return final

    def read_trail(self, revision: int) -> tuple[bytes, bytes]:
        """The unverified state and signature bytes of an installed revision."""
        trail = self.trail(revision)
        try:
            return (trail / STATE_FILE).read_bytes(), (trail / SIGNATURE_FILE).read_bytes()
        except FileNotFoundError as e:
            raise StoreError(f"revision {revision} is not installed") from e
        except OSError as e:
            raise _os_error(f"read revision {revision}", e) from e

    def remove_revision(self, revision: int) -> None:
        """Remove a trail: renamed away first, so a crash never leaves half a trail."""
        trail = self.trail(revision)
        if not trail.exists():
            return
        trash = self.trails / f".trash-{revision}-{_token()}"
        try:
            os.rename(trail, trash)
            fsync_dir(self.trails)
        except OSError as e:
            raise _os_error(f"remove revision {revision}", e) from e
        remove_tree(trash)

    def clean_temp(self) -> None:
        self.objects.clean_temp()
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.trails):
                if entry.name.startswith((".tmp-", ".trash-")):
                    remove_tree(entry.path)

    def referenced_by(self, revision: int) -> set[str]:
        from pvpy.errors import ManifestError
        from pvpy.state import canonical

        state, _ = self.read_trail(revision)
        try:
            return referenced_objects(canonical.decode(state))
        except ManifestError as e:
            # Never guess what an unreadable pinned revision needs: refuse to GC.
            raise StoreError(f"revision {revision} is unreadable, not collecting: {e}") from e

    def gc(self, pinned: Iterable[int]) -> GcResult:
        """Drop every revision not pinned, then every object no pinned revision names.

        Raises StoreError (and removes nothing) when a pinned revision is
        missing or unreadable.
        """
        pins = sorted(set(pinned))
        keep: set[str] = set()
        for rev in pins:
            keep |= self.referenced_by(rev)
        dropped = [r for r in self.revisions() if r not in pins]
        for rev in dropped:
            self.remove_revision(rev)
        freed = 0
        for name in self.objects.names():
            if name not in keep:
                with contextlib.suppress(OSError):
                    freed += self.objects.path(name).stat().st_size
        removed = self.objects.gc(keep)
        self.clean_temp()
        return GcResult(removed_objects=removed, removed_revisions=dropped, freed_bytes=freed)
