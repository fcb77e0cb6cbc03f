"""The U-Boot environment, in the binary layout U-Boot and libubootenv (fw_printenv) use.

One copy is ``size`` bytes (``CONFIG_ENV_SIZE``, the third column of fw_env.config)::

    single copy:     crc32 (4 bytes, little-endian) | data (size - 4)
    redundant copy:  crc32 (4 bytes, little-endian) | flags (1 byte) | data (size - 5)

The CRC (zlib's crc32) covers the whole data area, padding included. Data is
``name=value\\0`` entries sorted by name, ended by an empty entry (a second
``\\0``); a later duplicate wins, an entry without ``=`` is skipped. The padding
after it is read by nobody: U-Boot's saveenv zero-fills it (``hexport_r``), while
libubootenv 0.3.2's fw_setenv leaves whatever its buffer held (checked: the old
bytes of the copy survive, 0x00, 0xFF or garbage alike). We pad with 0x00.

Redundant copies (two files, or two offsets of one file or device): the flags
byte is a counter. Of two copies with a good CRC the higher counter wins, except
that 0 beats 255 (the counter wraps) and equal counters pick the first copy; a
copy with a bad CRC is ignored. A write goes to the copy that is *not* current,
with counter + 1, so a power cut half way leaves a bad CRC there and the old copy
is still the one read. These are U-Boot's and libubootenv's rules exactly.

No copy with a good CRC (blank flash, or corruption): U-Boot boots its built-in
default environment and fw_printenv prints its default file (``-f``). ``read()``
does the same - it returns ``defaults`` (``{}`` without them) and sets
``was_corrupt`` - and never raises for it, so a corrupt environment never stops
pvpy from booting. ``write()`` over such an environment refuses unless
``defaults`` were given: once U-Boot finds a good CRC it loads that environment
*instead of* its built-in one, so an environment of only pvpy's variables would
lose bootcmd and friends and brick the board. fw_setenv refuses likewise without
``-f``.

Writes: a regular file that holds exactly one copy (offset 0, file size = size,
e.g. ``uboot.env`` on a FAT partition) is replaced by ``write_atomic``; anything
else (a block device, a copy at an offset) is written in place and fsynced, which
is only crash-safe with redundant copies. MTD character devices (which need an
erase first) are refused: use fw_setenv there. Like libubootenv we hold
``/var/lock/fw_printenv.lock`` while reading and writing, so pvpy and a
concurrent fw_setenv do not lose each other's changes. ``.flags`` is kept as an
ordinary variable; its access rules (read-only variables) are not enforced.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import struct
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from pvpy._record import Record
from pvpy.errors import BootEnvError, StoreError
from pvpy.store import write_atomic

DEFAULT_SIZE = 0x40000
LOCKFILE = Path("/var/lock/fw_printenv.lock")


class _Place(Record):
    """Where one copy lives."""

    path: Path
    offset: int


class _Copy(Record):
    """One copy as read: ``values`` is None unless its CRC is good."""

    flags: int
    values: dict[str, str] | None


def _text(raw: bytes) -> str:
    # surrogateescape: any byte string round-trips, even if it is not UTF-8.
    return raw.decode("utf-8", "surrogateescape")


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def parse_data(data: bytes) -> dict[str, str] | None:
    """The variables of a data area; None if it has no terminating empty entry."""
    values: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        end = data.find(b"\0", pos)
        if end < 0:
            return None  # runs off the end: libubootenv calls this an I/O error
        name, sep, value = data[pos:end].partition(b"=")
        if sep:
            values[_text(name)] = _text(value)
        pos = end + 1
    if pos >= len(data):
        return None
    return values


def serialize_data(values: Mapping[str, str], data_size: int) -> bytes:
    """The data area for ``values``: sorted like U-Boot's export, zero padded.

    Raises BootEnvError if it does not fit.
    """
    entries = sorted((_raw(k), _raw(v)) for k, v in values.items())
    body = b"".join(k + b"=" + v + b"\0" for k, v in entries) + b"\0"
    if len(body) > data_size:
        raise BootEnvError(f"uboot: environment needs {len(body)} bytes, only {data_size} fit")
    return body + bytes(data_size - len(body))


def _check(name: str, value: str | None) -> None:
    # U-Boot's own rules: '=' ends a name, NUL ends an entry, an empty name
    # makes U-Boot drop the whole environment for its default one.
    if not name or "=" in name or "\0" in name:
        raise BootEnvError(f"uboot: invalid variable name {name!r}")
    if value is not None and "\0" in value:
        raise BootEnvError(f"uboot: value of {name} contains NUL")


def load_defaults(path: Path) -> dict[str, str]:
    """A default environment file (``u-boot-initial-env``), read like ``fw_setenv -f``.

    ``name=value`` lines; ``#`` comments and lines without ``=`` are skipped, an
    empty value unsets.
    """
    try:
        text = path.read_bytes()
    except OSError as e:
        raise BootEnvError(f"uboot: cannot read default environment {path}: {e}") from e
    values: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(b"=")
        if not sep or not line or line.startswith(b"#"):
            continue
        if value:
            values[_text(name)] = _text(value)
        else:
            values.pop(_text(name), None)
    return values


class UBootEnv:
    """A U-Boot environment in a file or on a block device, one copy or two.

    ``redundant_path`` and/or ``redundant_offset`` give the second copy: another
    file (at ``redundant_offset``, default ``offset``), or another offset of
    ``path``. ``defaults`` (a mapping, or a ``u-boot-initial-env`` file) is what
    U-Boot uses when no copy is valid; see the module docstring.
    """

    name = "uboot"

    def __init__(
        self,
        path: Path,
        size: int = DEFAULT_SIZE,
        redundant_path: Path | None = None,
        offset: int = 0,
        *,
        redundant_offset: int | None = None,
        defaults: Mapping[str, str] | Path | None = None,
        lockfile: Path | None = LOCKFILE,
    ) -> None:
        self.path = Path(path)
        self.size = size
        self.redundant = redundant_path is not None or redundant_offset is not None
        header = 5 if self.redundant else 4
        if size <= header + 1:
            raise BootEnvError(f"uboot: environment size {size} is too small")
        self.data_size = size - header
        self.places = [_Place(self.path, offset)]
        if self.redundant:
            second = _Place(
                Path(redundant_path) if redundant_path is not None else self.path,
                redundant_offset if redundant_offset is not None else offset,
            )
            if (
                second.path.absolute() == self.path.absolute()
                and abs(second.offset - offset) < size
            ):
                raise BootEnvError(
                    f"uboot: the two copies overlap ({self.path} at {offset:#x} "
                    f"and {second.offset:#x}, size {size:#x})"
                )
            self.places.append(second)
        self.defaults = defaults
        self.lockfile = lockfile
        self.was_corrupt = False  # set by read()/write(): no copy had a good CRC
        self.active_copy: int | None = None  # index into places of the copy read

    def try_reboot_argument(self) -> str | None:
        return None  # a plain restart: the bootloader reads pv_try

    def writes_try_partition(self) -> bool:
        return False  # the bootloader loads kernel and initrd from the trail

    def fw_env_config(self) -> str:
        """The ``/etc/fw_env.config`` lines that make fw_printenv see this environment."""
        return "".join(f"{p.path} {p.offset:#x} {self.size:#x}\n" for p in self.places)

    def read(self) -> dict[str, str]:
        with self._locked():
            copies = [self._load(p) for p in self.places]
        current = self._choose(copies)
        if current is None:
            return self._default_values()
        values = copies[current].values
        assert values is not None
        return dict(values)

    def write(self, changes: Mapping[str, str | None]) -> None:
        for key, value in changes.items():
            _check(key, value)
        with self._locked():
            copies = [self._load(p) for p in self.places]
            current = self._choose(copies)
            if current is None:
                if self.defaults is None:
                    raise BootEnvError(
                        f"uboot: no valid environment in {self.path}; refusing to write one "
                        "without defaults (U-Boot would lose its built-in environment)"
                    )
                old = self._default_values()
            else:
                stored = copies[current].values
                assert stored is not None
                old = stored
            values = dict(old)
            for key, value in changes.items():
                if value is None:
                    values.pop(key, None)
                else:
                    values[key] = value
            if current is not None and values == old:
                return  # nothing changes: spare the flash a write
            data = serialize_data(values, self.data_size)
            crc = zlib.crc32(data)
            if not self.redundant:
                self._store(self.places[0], struct.pack("<I", crc) + data)
                self.active_copy = 0
                self.was_corrupt = False
                return
            # Never touch the current copy: it is what survives a cut in this write.
            source = current if current is not None else 0
            target = 1 - source
            flags = (copies[source].flags + 1) & 0xFF
            self._store(self.places[target], struct.pack("<IB", crc, flags) + data)
            self.active_copy = target
            self.was_corrupt = False

    def _default_values(self) -> dict[str, str]:
        if self.defaults is None:
            return {}
        if isinstance(self.defaults, Path):
            return load_defaults(self.defaults)
        return dict(self.defaults)

    def _choose(self, copies: list[_Copy]) -> int | None:
        """Which copy U-Boot boots with (None: none valid); sets the status attributes."""
        valid = [i for i, c in enumerate(copies) if c.values is not None]
        if len(valid) == 2:
            a, b = copies[0].flags, copies[1].flags
            if a == 0xFF and b == 0:
                current: int | None = 1
            elif b == 0xFF and a == 0:
                current = 0
            else:
                current = 1 if b > a else 0
        else:
            current = valid[0] if valid else None
        self.active_copy = current
        self.was_corrupt = current is None
        return current

    def _load(self, place: _Place) -> _Copy:
        try:
            fd = os.open(place.path, os.O_RDONLY)
        except OSError as e:
            raise BootEnvError(f"uboot: cannot open {place.path}: {e.strerror}") from e
        try:
            raw = os.pread(fd, self.size, place.offset)
        except OSError as e:
            raise BootEnvError(f"uboot: cannot read {place.path}: {e.strerror}") from e
        finally:
            os.close(fd)
        if len(raw) < self.size:
            return _Copy(0, None)  # cut short (a truncated file): as good as a bad CRC
        header = 5 if self.redundant else 4
        data = raw[header:]
        flags = raw[4] if self.redundant else 0
        if struct.unpack_from("<I", raw)[0] != zlib.crc32(data):
            return _Copy(flags, None)
        return _Copy(flags, parse_data(data))

    def _store(self, place: _Place, image: bytes) -> None:
        try:
            st = os.stat(place.path)
        except OSError as e:
            raise BootEnvError(f"uboot: cannot write {place.path}: {e.strerror}") from e
        if stat.S_ISCHR(st.st_mode):
            raise BootEnvError(
                f"uboot: {place.path} is a character device (MTD?): it needs an erase "
                "before a write, which pvpy does not do; use fw_setenv"
            )
        if stat.S_ISREG(st.st_mode) and place.offset == 0 and st.st_size == len(image):
            try:
                write_atomic(place.path, image, stat.S_IMODE(st.st_mode))
            except StoreError as e:
                raise BootEnvError(f"uboot: {e}") from e
            return
        try:
            fd = os.open(place.path, os.O_WRONLY)
            try:
                view, pos = memoryview(image), place.offset
                while view:
                    done = os.pwrite(fd, view, pos)
                    view, pos = view[done:], pos + done
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise BootEnvError(f"uboot: cannot write {place.path}: {e.strerror}") from e

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = -1
        if self.lockfile is not None:
            try:
                fd = os.open(self.lockfile, os.O_WRONLY | os.O_CREAT, 0o666)
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                # Best effort, as in libubootenv: a read-only /var/lock must not
                # make the boot environment unreadable.
                if fd >= 0:
                    os.close(fd)
                fd = -1
        try:
            yield
        finally:
            if fd >= 0:
                os.close(fd)  # closing releases the flock
