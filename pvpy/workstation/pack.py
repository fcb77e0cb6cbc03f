"""Turn a rootfs source into a squashfs image object (workstation side).

Sources:

- a directory                       -> mksquashfs
- a tarball (.tar, .tar.gz, .tgz, .tar.xz, .tar.bz2)
                                    -> read as a tar stream, then tar2sqfs
- an OCI image layout directory (has ``oci-layout`` and ``index.json``)
                                    -> blobs hash-checked, layers merged in
                                       order with whiteouts, then tar2sqfs
- a docker-archive (``docker save``, ``skopeo copy ... docker-archive:``)
                                    -> layers checked against the config's
                                       diff_ids, merged as an OCI layout's
- a squashfs file (.squashfs, .sqfs) -> stored as is

An image's config says how to run it (Entrypoint/Cmd, Env, WorkingDir, User,
StopSignal, Volumes, and a docker-archive's Healthcheck): imageconfig.py reads
it; spec.py fills what the spec leaves out. The image's own /etc/passwd and
/etc/group are read here from the merged layers (``ImageAccounts``), so a
user's name resolves through them, never the workstation's.

Tarballs and OCI layers are never extracted: their members are merged as names
in memory (tarmerge.py) and the one merged stream becomes the image through
tar2sqfs (Debian's squashfs-tools-ng). Extracting a third-party archive as root
and checking paths with realpath is not safe (CVE-2025-4517; tarmerge.py says
why); a directory is the developer's own tree, so mksquashfs reads it.

Why squashfs: read-only, compressed, mountable by every Linux kernel without
unpacking (the device mounts it as the overlay's lower layer), and built by
Debian's squashfs-tools. Images are made reproducible (every time 0; mksquashfs
sorts a directory, tar2sqfs keeps the merged stream's order, which depends on
the input only) so the same input gives the same object and updates send nothing.

Compression: zstd by default. Against gzip (mksquashfs's default) it gave
6-10% smaller images that a freshly mounted image reads 1.2-1.9x faster
(first exec of busybox ~20 -> ~10 ms, reading a 52 MB Python stdlib tree
~500 -> ~300 ms); mksquashfs takes 0.7-1.5x gzip's time (bench/findings.md).
Every board's kernel (Debian's linux-image-arm64: CONFIG_SQUASHFS_ZSTD=y)
mounts it. lz4 reads a little faster but is 36-51% bigger; xz is 10-20%
smaller but reads 3-4x slower. A spec may choose any of COMPRESSORS per source.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pvpy import _run
from pvpy.errors import SpecError, one_line
from pvpy.store import ObjectStore
from pvpy.workstation.imageconfig import GROUP, PASSWD, ImageAccounts, ImageConfig, run_config
from pvpy.workstation.imageconfig import (
    _stop_signal_name as _stop_signal_name,  # re-exported: tests/test_state.py imports it here
)
from pvpy.workstation.tarmerge import LayerMerge, normalise, resolve_links

COMPRESSORS = ("gzip", "xz", "zstd", "lz4", "lzo")
DEFAULT_COMPRESSION = "zstd"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")
SQUASHFS_SUFFIXES = (".squashfs", ".sqfs")
SQUASHFS_MAGIC = b"hsqs"


@dataclass(frozen=True)
class PackedImage:
    sha256: str
    size: int
    config: ImageConfig
    accounts: ImageAccounts | None = None  # None: not read (a squashfs source)


def _check_compression(compression: str) -> None:
    if compression not in COMPRESSORS:
        raise SpecError(f"unknown compression {compression!r} (one of {', '.join(COMPRESSORS)})")


def squash_dir(
    src: Path, out: Path, compression: str = DEFAULT_COMPRESSION, all_root: bool = False
) -> None:
    """mksquashfs ``src`` into the file ``out``. Raises SpecError / CommandError."""
    _check_compression(compression)
    if _run.which("mksquashfs") is None:
        raise SpecError("mksquashfs not found: install Debian's squashfs-tools")
    argv = [
        "mksquashfs", str(src), str(out),
        "-noappend", "-no-progress", "-quiet",
        "-comp", compression,
    ]  # fmt: skip
    # Every time 0, for reproducible images. mksquashfs refuses -mkfs-time and
    # -all-time while SOURCE_DATE_EPOCH is set (pvpy build honours it, _run
    # passes it on): then say the same through it, an epoch of 0 clamps all.
    env = None
    if "SOURCE_DATE_EPOCH" in os.environ:
        env = {"SOURCE_DATE_EPOCH": "0"}
    else:
        argv += ["-mkfs-time", "0", "-all-time", "0"]
    if all_root:
        argv.append("-all-root")
    _run.run(argv, env=env)


# What a broken archive raises while tarfile reads it (bad headers, a truncated or
# corrupt gzip/xz/bz2 stream, names that do not decode): each becomes a SpecError.
_ARCHIVE_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)


@contextlib.contextmanager
def _reading(what: str | Path) -> Iterator[None]:
    """Say in one line which archive is broken, whatever broke in it."""
    try:
        yield
    except _ARCHIVE_ERRORS as e:
        raise SpecError(
            f"{what}: not a readable tarball: {one_line(str(e)) or type(e).__name__}"
        ) from e


# Compressions by their magic bytes: opening with the one named makes its error the
# message (tarfile's "r:*" lists every method it tried).
_TarReadMode = Literal["r:", "r:gz", "r:bz2", "r:xz"]
_TAR_COMPRESSIONS: tuple[tuple[bytes, _TarReadMode], ...] = (
    (b"\x1f\x8b", "r:gz"),
    (b"BZh", "r:bz2"),
    (b"\xfd7zXZ\x00", "r:xz"),
)


def _open_tar(archive: Path | bytes) -> tarfile.TarFile:
    """A tarball, compressed (gzip, xz, bz2) or not, opened for reading its members."""
    if isinstance(archive, Path):
        with open(archive, "rb") as f:
            head = f.read(6)
    else:
        head = archive[:6]
    mode: _TarReadMode = next((m for magic, m in _TAR_COMPRESSIONS if head.startswith(magic)), "r:")
    if isinstance(archive, Path):
        return tarfile.open(archive, mode)
    return tarfile.open(fileobj=io.BytesIO(archive), mode=mode)


def squash_tar_layers(
    layers: Sequence[tuple[str, Path | bytes]],
    out: Path,
    compression: str = DEFAULT_COMPRESSION,
    all_root: bool = False,
    *,
    oci_whiteouts: bool = False,
) -> ImageAccounts:
    """Merge tar ``layers`` (named for errors; a tarball is one layer) and tar2sqfs
    the result into the file ``out``; return the merged tree's accounts. No member
    is ever written to the filesystem (tarmerge.py says why). Raises SpecError /
    CommandError.
    """
    _check_compression(compression)
    if _run.which("tar2sqfs") is None:
        raise SpecError("tar2sqfs not found: install Debian's squashfs-tools-ng")
    merge = LayerMerge()
    argv = [
        "tar2sqfs", "--quiet",
        "--no-skip",  # a record it cannot read fails the build, never a smaller image
        "--no-xattr",  # as mksquashfs of an extracted tree: tarfile never restored them
        "--exportable",  # as mksquashfs makes them
        "--compressor", compression,
        # Parents the stream only implies: as mkdir made them; times 0, for reproducible images.
        "--defaults", "uid=0,gid=0,mode=0755,mtime=0",
        str(out),
    ]  # fmt: skip
    # The merged stream goes through a temp file beside the image, not memory: a
    # distribution's rootfs is hundreds of MB uncompressed.
    with tempfile.TemporaryFile(dir=Path(out).parent) as stream:
        with contextlib.ExitStack() as open_layers:
            for what, layer in layers:
                with _reading(what):
                    archive = open_layers.enter_context(_open_tar(layer))
                    merge.add_layer(archive, oci_whiteouts=oci_whiteouts)
            with _reading(", ".join(what for what, _ in layers)):  # data may be cut short
                merge.write(stream, all_root=all_root)
                accounts = ImageAccounts(merge.read_file(PASSWD), merge.read_file(GROUP))
        stream.flush()
        stream.seek(0)
        _run.run(argv, stdin=stream)
    return accounts


def read_dir_accounts(root: Path) -> ImageAccounts:
    """The accounts of a directory tree, its symlinks followed inside it."""

    def readlink(name: str) -> str | None:
        path = root / name
        return os.readlink(path) if path.is_symlink() else None

    def read(name: str) -> bytes | None:
        resolved = resolve_links(name, readlink)
        path = root / resolved if resolved is not None else None
        if path is None or not path.is_file() or path.is_symlink():
            return None
        return path.read_bytes()

    try:
        return ImageAccounts(read(PASSWD), read(GROUP))
    except OSError as e:
        raise SpecError(f"{root}: cannot read its /{PASSWD} or /{GROUP}: {e.strerror}") from e


def _read_blob(layout: Path, digest: str) -> bytes:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
        raise SpecError(f"{layout}: unsupported digest {digest!r} (sha256:HEX)")
    path = layout / "blobs" / "sha256" / hexd
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SpecError(f"{layout}: missing blob {digest}") from e
    if hashlib.sha256(data).hexdigest() != hexd:
        raise SpecError(f"{layout}: blob {digest} is corrupt")
    return data


def _blob_json(layout: Path, digest: str) -> Any:
    try:
        return json.loads(_read_blob(layout, digest))
    except ValueError as e:
        raise SpecError(f"{layout}: blob {digest} is not JSON") from e


def is_oci_layout(path: Path) -> bool:
    return (path / "oci-layout").is_file() and (path / "index.json").is_file()


def _digest_of(descriptor: Any, where: str) -> str:
    """The digest of an OCI descriptor (a JSON object); SpecError when it is not one."""
    digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
    if not isinstance(digest, str):
        raise SpecError(f"{where}: not a descriptor with a digest")
    return digest


def _pick_manifest(layout: Path, tag: str | None) -> dict[str, Any]:
    index = _load_json(layout / "index.json")
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not all(isinstance(m, dict) for m in manifests):
        raise SpecError(f"{layout}: index.json has no list of manifests")
    if tag is not None:
        manifests = [
            m
            for m in manifests
            if isinstance(m.get("annotations"), dict)
            and m["annotations"].get("org.opencontainers.image.ref.name") == tag
        ]
    if len(manifests) != 1:
        what = f"tag {tag!r}" if tag else "exactly one image (name a tag)"
        raise SpecError(f"{layout}: index.json does not hold {what}")
    desc = manifests[0]
    digest = _digest_of(desc, f"{layout}: index.json")
    doc = _blob_json(layout, digest)
    media = desc.get("mediaType") or (doc.get("mediaType") if isinstance(doc, dict) else "")
    if isinstance(media, str) and media.endswith("image.index.v1+json"):
        raise SpecError(f"{layout}: multi-platform index; pick one platform's manifest first")
    if not isinstance(doc, dict) or not isinstance(doc.get("layers"), list):
        raise SpecError(f"{layout}: {digest} is not an image manifest")
    return doc


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise SpecError(f"{path}: unreadable JSON: {one_line(str(e))}") from e


def _oci_layers(layout: Path, manifest: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The manifest's layers, hash-checked, still compressed (tarfile opens them)."""
    layers = []
    for layer in manifest["layers"]:
        digest = _digest_of(layer, f"{layout}: a layer of the manifest")
        media = layer.get("mediaType")
        if isinstance(media, str) and media.endswith("+zstd"):
            raise SpecError(f"{layout}: zstd layers are not supported yet")
        layers.append((f"{layout}: layer {digest}", _read_blob(layout, digest)))
    return layers


def _image_config(layout: Path, manifest: dict[str, Any]) -> ImageConfig:
    """The run defaults of an OCI image's config blob; SpecError when malformed."""
    digest = _digest_of(manifest.get("config"), f"{layout}: the manifest's config")
    return run_config(_blob_json(layout, digest), f"{layout}: config {digest}")


def squash_oci(
    layout: Path, tag: str | None, out: Path, compression: str, all_root: bool
) -> tuple[ImageConfig, ImageAccounts]:
    """Squash an OCI image layout's layers (in order, with whiteouts) into ``out``;
    return its run config and accounts. Raises SpecError / CommandError."""
    manifest = _pick_manifest(layout, tag)
    config = _image_config(layout, manifest)
    layers = _oci_layers(layout, manifest)
    return config, squash_tar_layers(layers, out, compression, all_root, oci_whiteouts=True)


def squash_docker_archive(
    archive: Path, tag: str | None, out: Path, compression: str, all_root: bool
) -> tuple[ImageConfig, ImageAccounts]:
    """Squash the image of a docker-archive (``docker save``; ``skopeo copy``'s
    ``docker-archive:``) into ``out``; return its run config and accounts.

    Why read it and not ask for an OCI layout: converting one into the other
    (``skopeo copy docker-archive:... oci:...``) rewrites the config as an OCI
    config, which has no Healthcheck. Its manifest.json names no digests: the
    config's file name (its sha256) and its ``rootfs.diff_ids`` (each layer's
    uncompressed sha256) are checked instead. Raises SpecError / CommandError.
    """
    with _reading(archive), _open_tar(archive) as outer:
        manifest = _archive_json(outer, archive, "manifest.json")
        entry = _pick_archive_image(manifest, archive, tag)
        config_name = entry.get("Config")
        layer_names = entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise SpecError(f"{archive}: manifest.json: an image without Config and Layers")
        config_bytes = _archive_member(outer, archive, config_name)
        named = Path(config_name).name.removesuffix(".json")
        if _is_sha256_hex(named) and hashlib.sha256(config_bytes).hexdigest() != named:
            raise SpecError(f"{archive}: config {config_name} is corrupt")
        where = f"{archive}: config {config_name}"
        try:
            doc = json.loads(config_bytes)
        except ValueError as e:
            raise SpecError(f"{where}: not JSON") from e
        config = run_config(doc, where)
        rootfs = doc.get("rootfs")
        diff_ids = (rootfs.get("diff_ids") if isinstance(rootfs, dict) else None) or []
        if not isinstance(diff_ids, list) or len(diff_ids) not in (0, len(layer_names)):
            raise SpecError(f"{where}: rootfs.diff_ids does not match the layers")
        layers: list[tuple[str, Path | bytes]] = []
        for i, name in enumerate(layer_names):
            if not isinstance(name, str):
                raise SpecError(f"{archive}: manifest.json: a layer name is not a string")
            data = _archive_member(outer, archive, name)
            diff_id = "sha256:" + hashlib.sha256(_uncompressed(data)).hexdigest()
            if diff_ids and diff_ids[i] != diff_id:
                raise SpecError(f"{archive}: layer {name} is corrupt (not its config's diff_id)")
            layers.append((f"{archive}: layer {name}", data))
    return config, squash_tar_layers(layers, out, compression, all_root, oci_whiteouts=True)


def _is_sha256_hex(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _uncompressed(data: bytes) -> bytes:
    """A layer's tar bytes, as its diff_id hashes them."""
    if data.startswith(b"\x1f\x8b"):
        return gzip.decompress(data)
    if data.startswith(b"BZh"):
        return bz2.decompress(data)
    if data.startswith(b"\xfd7zXZ\x00"):
        return lzma.decompress(data)
    return data


def _archive_member(outer: tarfile.TarFile, archive: Path, name: str) -> bytes:
    """The bytes of the member ``name`` ("./name" too, as ``tar -C dir .`` writes it;
    a link in the archive followed by tarfile)."""
    wanted = normalise(name, f"{archive}: member")
    member = next((m for m in reversed(outer.getmembers()) if _plain_name(m.name) == wanted), None)
    if member is None:
        raise SpecError(f"{archive}: no {name} in the archive")
    data = outer.extractfile(member)
    if data is None:
        raise SpecError(f"{archive}: {name} is not a file")
    return data.read()


def _plain_name(name: str) -> str:
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def _archive_json(outer: tarfile.TarFile, archive: Path, name: str) -> Any:
    try:
        return json.loads(_archive_member(outer, archive, name))
    except ValueError as e:
        raise SpecError(f"{archive}: {name} is not JSON") from e


def _pick_archive_image(manifest: Any, archive: Path, tag: str | None) -> dict[str, Any]:
    """The one image of manifest.json, or the one ``tag`` names: a whole RepoTags
    entry ("docker.io/acme/web:1.2") or its tag ("1.2")."""
    if not isinstance(manifest, list) or not all(isinstance(m, dict) for m in manifest):
        raise SpecError(f"{archive}: manifest.json is not a list of images")
    images = manifest
    if tag is not None:
        images = [
            m
            for m in manifest
            if isinstance(m.get("RepoTags"), list)
            and any(
                isinstance(ref, str) and (ref == tag or ref.rpartition(":")[2] == tag)
                for ref in m["RepoTags"]
            )
        ]
    if len(images) != 1:
        what = f"tag {tag!r}" if tag else "exactly one image (name a tag)"
        raise SpecError(f"{archive}: manifest.json does not hold {what}")
    image: dict[str, Any] = images[0]
    return image


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


@contextlib.contextmanager
def _scratch(near: Path) -> Iterator[Path]:
    near.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pack-", dir=near))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pack_rootfs(
    source: Path,
    store: ObjectStore,
    *,
    tag: str | None = None,
    compression: str = DEFAULT_COMPRESSION,
    all_root: bool = False,
    docker_archive: bool = False,
) -> PackedImage:
    """Build the squashfs image of ``source`` (a docker-archive if it says so) into
    ``store``. Raises SpecError."""
    source = Path(source)
    if not source.exists():
        raise SpecError(f"{source}: no such file or directory")
    store.ensure()
    config = ImageConfig()
    name = source.name
    if docker_archive and not source.is_file():
        raise SpecError(f"{source}: a docker-archive is a file (docker save's tarball)")
    if source.is_file() and (name.endswith(SQUASHFS_SUFFIXES) or _magic(source) == SQUASHFS_MAGIC):
        sha = store.put_file(source)
        return PackedImage(sha, store.size(sha), config)
    with _scratch(store.tmp) as tmp:
        image = tmp / "image.squashfs"
        if docker_archive:
            config, accounts = squash_docker_archive(source, tag, image, compression, all_root)
        elif source.is_dir() and is_oci_layout(source):
            config, accounts = squash_oci(source, tag, image, compression, all_root)
        elif source.is_dir():
            squash_dir(source, image, compression, all_root)
            accounts = read_dir_accounts(source)
        elif name.endswith(TAR_SUFFIXES):
            layers: list[tuple[str, Path | bytes]] = [(str(source), source)]
            accounts = squash_tar_layers(layers, image, compression, all_root)
        else:
            raise SpecError(
                f"{source}: not a directory, tarball ({', '.join(TAR_SUFFIXES)}), "
                "OCI image layout or squashfs image"
            )
        sha = store.put_file(image)
    return PackedImage(sha, store.size(sha), config, accounts)
