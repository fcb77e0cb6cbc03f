"""Merge tar layers into one tar stream, in memory: nothing is ever extracted.

Why not extract and check: a rootfs build runs as root on third-party images,
and checking where a member would land with ``os.path.realpath`` cannot be
made safe here. A chain of symlinks whose resolved path outgrows PATH_MAX
makes non-strict realpath give up and go on lexically, so tarfile's "tar" and
"data" filters (Python 3.11) wave through a member that the kernel then
writes, or a whiteout that deletes, outside the tree (CVE-2025-4517). So no
member ever touches the filesystem: names are plain strings, normalised
lexically (never absolute, never ".."), symlinks are data and never
followed, and a member under a non-directory is refused. The merged stream
goes to tar2sqfs (pack.py), which writes one file: the image.

Semantics, as OCI image layers ("Applying changesets", image spec layer.md):
layers apply in order and the last version of a path wins; in a layer,
``.wh.NAME`` deletes NAME and ``.wh..wh..opq`` empties its directory, both
of the lower layers only (they apply before the layer's own entries); a
directory over a directory keeps its children, anything else over a path
replaces the path and everything under it. A plain tarball is one layer
without whiteouts. A hard link keeps the member it named when it was read:
if that member is later replaced or deleted, the link becomes a copy of it.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from pvpy.errors import SpecError

__all__ = ["LayerMerge", "resolve_links"]

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
ROOT = ""  # the normalised name of the image's root directory

# Member types kept as they are; any other type (tarfile reads it as data) becomes
# a regular file, as tarfile's extraction made it before.
_SPECIAL_TYPES = (tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE)


@dataclass(eq=False)
class _Entry:
    """The version of one path that is on top so far."""

    path: str
    member: tarfile.TarInfo
    archive: tarfile.TarFile
    order: tuple[int, int]  # (layer, position in it): the output keeps this order
    link_target: _Entry | None = None  # a hard link's member, as it was when read


def normalise(name: str, what: str) -> str:
    """``name`` as a path inside the image ("./a//b/" -> "a/b", "./" -> the root).

    Raises SpecError for an absolute name or one with "..": nothing may name a
    place outside the image, whatever symlinks the image holds.
    """
    if name.startswith("/"):
        raise SpecError(f"{what} {name!r} is absolute: outside the image")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise SpecError(f"{what} {name!r} has '..': outside the image")
    return "/".join(parts)


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


# As the kernel's limit on symlinks followed in one lookup (ELOOP beyond).
MAX_LINK_HOPS = 40


def resolve_links(path: str, readlink: Callable[[str], str | None]) -> str | None:
    """``path`` (relative to the image's root) with every symlink in it resolved
    inside the image, as a lookup in a chroot of it would: an absolute target starts
    again at the image's root, ".." stops there. ``readlink(p)`` gives the target of
    ``p`` if it is a symlink, else None. None when the links loop (ELOOP).

    Only names are walked: nothing of the host is ever looked at.
    """
    todo = [part for part in path.split("/") if part not in ("", ".")]
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        target = readlink("/".join([*done, part]))
        if target is None:
            done.append(part)
            continue
        hops += 1
        if hops > MAX_LINK_HOPS:
            return None
        if target.startswith("/"):
            done = []
        todo = [p for p in target.split("/") if p not in ("", ".")] + todo
    return "/".join(done)


class LayerMerge:
    """The tree the layers make, held as names; ``write`` emits it as one tar stream.

    Raises SpecError for a member that names a place outside the image, or
    tarfile/OS errors of a broken archive (the caller says which source).
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        # Every path present, explicit or implied by a deeper name, under its parent.
        self._children: dict[str, set[str]] = {ROOT: set()}
        self._layers = 0

    def add_layer(self, archive: tarfile.TarFile, *, oci_whiteouts: bool) -> None:
        layer = self._layers
        self._layers += 1
        members = []
        for member in archive.getmembers():
            path = normalise(member.name, "member")
            base = path.rpartition("/")[2]
            if oci_whiteouts and base.startswith(WHITEOUT_PREFIX):
                self._apply_whiteout(path, member.name)
            else:
                members.append((path, member))
        for position, (path, member) in enumerate(members):
            self._add(_Entry(path, member, archive, (layer, position)))

    def _apply_whiteout(self, path: str, name: str) -> None:
        parent, _, base = path.rpartition("/")
        if base == OPAQUE_MARKER:
            for child in list(self._children.get(parent, ())):
                self._remove(child)
            return
        victim = base.removeprefix(WHITEOUT_PREFIX)
        if victim in ("", ".", ".."):
            raise SpecError(f"whiteout {name!r} names no entry: outside the image")
        # A name under a symlink is never in the tree: such a whiteout removes nothing.
        self._remove(f"{parent}/{victim}" if parent else victim)

    def _add(self, entry: _Entry) -> None:
        member, path = entry.member, entry.path
        if path == ROOT and not member.isdir():
            raise SpecError(f"member {member.name!r}: the image's root must be a directory")
        self._refuse_under_non_directory(path, member.name)
        if member.islnk():
            entry.link_target = self._hard_link_target(member)
        lower = self._entries.get(path)
        if lower is not None and not (lower.member.isdir() and member.isdir()):
            self._remove(path)
        self._entries[path] = entry
        while path != ROOT:  # the path and its implied parents, for removals
            parent = _parent(path)
            self._children.setdefault(parent, set()).add(path)
            path = parent

    def _refuse_under_non_directory(self, path: str, name: str) -> None:
        parent = _parent(path)
        while parent != ROOT:
            above = self._entries.get(parent)
            if above is not None and not above.member.isdir():
                # A symlink is never followed: a member "through" one is refused.
                raise SpecError(f"member {name!r} lies under {parent!r}, which is not a directory")
            parent = _parent(parent)

    def _hard_link_target(self, member: tarfile.TarInfo) -> _Entry:
        target_path = normalise(member.linkname, f"hard link {member.name!r} to")
        target = self._entries.get(target_path)
        if target is None or target.member.isdir():
            raise SpecError(f"hard link {member.name!r} to {member.linkname!r}: no such file")
        return target.link_target or target

    def _remove(self, path: str) -> None:
        """Drop ``path`` and everything under it (a loop: a deep tree must not
        exhaust Python's recursion limit)."""
        if path == ROOT:
            raise SpecError("a whiteout cannot remove the image's root")
        self._children.get(_parent(path), set()).discard(path)
        doomed = [path]
        while doomed:
            current = doomed.pop()
            self._entries.pop(current, None)
            doomed.extend(self._children.pop(current, ()))

    def read_file(self, path: str) -> bytes | None:
        """The content of the regular file at ``path`` in the merged tree (symlinks
        followed inside it), or None when there is none. The layers' archives must
        still be open."""

        def readlink(name: str) -> str | None:
            entry = self._entries.get(name)
            return entry.member.linkname if entry is not None and entry.member.issym() else None

        resolved = resolve_links(path, readlink)
        entry = self._entries.get(resolved) if resolved is not None else None
        if entry is None:
            return None
        source = (entry.link_target or entry) if entry.member.islnk() else entry
        if not source.member.isreg():
            return None
        data = source.archive.extractfile(source.member)
        return data.read() if data is not None else None

    def write(self, out: IO[bytes], *, all_root: bool) -> None:
        """Emit the merged tree as a tar stream: fresh headers (no pax extras, no
        xattrs, mtime 0, numeric ids) in layer order; parents it lacks are implied."""
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for entry in sorted(self._entries.values(), key=lambda e: e.order):
                info, source = self._header(entry)
                if all_root:
                    info.uid = info.gid = 0
                data = source.archive.extractfile(source.member) if info.isreg() else None
                tf.addfile(info, data)

    def _header(self, entry: _Entry) -> tuple[tarfile.TarInfo, _Entry]:
        """The output header of ``entry`` and the entry whose content it carries."""
        member = entry.member
        info = tarfile.TarInfo(entry.path or ".")
        info.mode = member.mode & 0o7777
        info.uid, info.gid = member.uid, member.gid
        info.mtime = 0
        source = entry
        if member.islnk():
            target = entry.link_target
            assert target is not None  # set by _add for every hard link
            if self._entries.get(target.path) is target:
                info.type, info.linkname = tarfile.LNKTYPE, target.path
                return info, entry
            source = target  # the name it linked to was replaced or deleted: a copy
        kind = source.member
        if kind.isdir():
            info.type = tarfile.DIRTYPE
        elif kind.type in _SPECIAL_TYPES:
            info.type, info.linkname = kind.type, kind.linkname
            info.devmajor, info.devminor = kind.devmajor, kind.devminor
        else:
            info.type, info.size = tarfile.REGTYPE, kind.size
        return info, source
