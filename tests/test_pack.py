"""pvpy.workstation.pack and pvpy.workstation.spec.build: sources become squashfs objects, checked with unsquashfs."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pvpy.errors import ManifestError, SpecError
from pvpy.store import ObjectStore, sha256_file
from pvpy.workstation.imageconfig import ImageAccounts, resolve_user, run_config
from pvpy.workstation.pack import PackedImage, pack_rootfs
from pvpy.workstation.spec import build

pytestmark = [
    pytest.mark.skipif(
        shutil.which("mksquashfs") is None or shutil.which("unsquashfs") is None,
        reason="squashfs-tools not installed",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ownership in images)"),
]

REF_NAME = "org.opencontainers.image.ref.name"


# ---------------------------------------------------------------- helpers


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return ObjectStore(tmp_path / "out" / "objects").ensure()


def listing(image: Path) -> dict[str, tuple[str, str, str]]:
    """``unsquashfs -lln``: path inside the image -> (mode string, uid/gid, symlink target)."""
    out = subprocess.run(
        ["unsquashfs", "-lln", str(image)], check=True, capture_output=True, text=True
    ).stdout
    entries = {}
    for line in out.splitlines():
        if not line.startswith(("d", "-", "l", "c", "b", "p", "s")):
            continue  # headers some unsquashfs versions print
        mode, owner, _size, _date, _time, rest = line.split(maxsplit=5)
        name, _, target = rest.partition(" -> ")
        name = name.removeprefix("squashfs-root").lstrip("/") or "/"
        entries[name] = (mode, owner, target)
    return entries


def unsquash(image: Path, dest: Path) -> Path:
    subprocess.run(
        ["unsquashfs", "-no-progress", "-d", str(dest), str(image)],
        check=True,
        capture_output=True,
    )
    return dest


def object_path(store: ObjectStore, packed: PackedImage) -> Path:
    path = store.path(packed.sha256)
    assert path.is_file()
    assert sha256_file(path) == packed.sha256  # named by the sha256 of its bytes
    assert path.stat().st_size == packed.size
    assert path.read_bytes()[:4] == b"hsqs"
    return path


def stored(store: ObjectStore) -> list[str]:
    return sorted(store.names())


def no_leftovers(store: ObjectStore) -> None:
    """No object was stored and no scratch dir was left in objects/.tmp."""
    assert stored(store) == []
    assert list(store.tmp.iterdir()) == []


def make_tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("box\n")
    (root / "bin").mkdir()
    app = root / "bin" / "app"
    app.write_text("#!/bin/sh\necho hi\n")
    app.chmod(0o755)
    (root / "bin" / "sh").symlink_to("app")
    for path in (root / "etc", root / "etc" / "hostname", app):
        os.chown(path, 1000, 1001)
    return root


def tar_bytes(entries: list[tuple[str, str, Any]], *, mode: str = "w:gz") -> bytes:
    """A tarball of (name, kind, arg): file (bytes | (bytes, mode)), dir (mode), sym, hard."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:  # type: ignore[call-overload]
        for name, kind, arg in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            if kind == "file":
                data, ti.mode = arg if isinstance(arg, tuple) else (arg, 0o644)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
                continue
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, arg or 0o755
            elif kind == "sym":
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, arg, 0o777
            elif kind == "hard":
                ti.type, ti.linkname, ti.mode = tarfile.LNKTYPE, arg, 0o755  # as its target
            else:
                raise AssertionError(kind)
            tf.addfile(ti)
    return buf.getvalue()


def files_named(root: Path, name: str) -> list[Path]:
    return [Path(d) / name for d, dirs, files in os.walk(root) if name in files + dirs]


# ---------------------------------------------------------------- 1. directory


def test_directory_becomes_reproducible_squashfs_object(tmp_path: Path, store: ObjectStore) -> None:
    tree = make_tree(tmp_path / "tree")

    first = pack_rootfs(tree, store)
    image = object_path(store, first)
    assert first.config.args == [] and first.config.env == {}

    entries = listing(image)
    assert set(entries) == {"/", "etc", "etc/hostname", "bin", "bin/app", "bin/sh"}
    assert entries["bin/app"][:2] == ("-rwxr-xr-x", "1000/1001")
    assert entries["etc/hostname"][:2] == ("-rw-r--r--", "1000/1001")
    assert entries["etc"][:2] == ("drwxr-xr-x", "1000/1001")
    assert entries["bin/sh"][0].startswith("l") and entries["bin/sh"][2] == "app"
    out = unsquash(image, tmp_path / "check")
    assert (out / "etc" / "hostname").read_text() == "box\n"

    # Same tree, again: the same object, stored once.
    assert pack_rootfs(tree, store) == first
    assert stored(store) == [first.sha256]

    # A copy made later (other mtimes, other inodes) still gives the same bytes.
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy, symlinks=True)
    for path in [copy, *copy.rglob("*")]:
        orig = os.lstat(tree / path.relative_to(copy))
        os.lchown(path, orig.st_uid, orig.st_gid)
        os.utime(path, (1, 1), follow_symlinks=False)
    assert os.stat(copy / "bin" / "app").st_ino != os.stat(tree / "bin" / "app").st_ino
    assert pack_rootfs(copy, store).sha256 == first.sha256


def test_source_date_epoch_gives_the_same_object(
    tmp_path: Path, store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mksquashfs refuses SOURCE_DATE_EPOCH with -all-time; pvpy build sets it."""
    tree = make_tree(tmp_path / "tree")
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    plain = pack_rootfs(tree, store)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert pack_rootfs(tree, store) == plain
    assert stored(store) == [plain.sha256]


def test_all_root_makes_every_owner_root(tmp_path: Path, store: ObjectStore) -> None:
    tree = make_tree(tmp_path / "tree")
    plain = pack_rootfs(tree, store)
    rooted = pack_rootfs(tree, store, all_root=True)

    assert rooted.sha256 != plain.sha256
    entries = listing(object_path(store, rooted))
    assert {owner for _mode, owner, _ in entries.values()} == {"0/0"}
    assert "1000/1001" in {owner for _mode, owner, _ in listing(store.path(plain.sha256)).values()}
    assert stored(store) == sorted([plain.sha256, rooted.sha256])


def test_compression_is_chosen_and_checked(tmp_path: Path, store: ObjectStore) -> None:
    tree = make_tree(tmp_path / "tree")
    xz = pack_rootfs(tree, store, compression="xz")
    assert xz.sha256 != pack_rootfs(tree, store).sha256
    assert (unsquash(store.path(xz.sha256), tmp_path / "x") / "bin" / "app").is_file()
    with pytest.raises(SpecError, match="unknown compression 'brotli'"):
        pack_rootfs(tree, store, compression="brotli")


def test_default_compression_is_zstd(tmp_path: Path, store: ObjectStore) -> None:
    # squashfs superblock: u16 compression id at byte 20 (1 gzip, 4 xz, 5 lz4, 6 zstd)
    def compressor(sha: str) -> int:
        return int.from_bytes(store.path(sha).read_bytes()[20:22], "little")

    tree = make_tree(tmp_path / "tree")
    assert compressor(pack_rootfs(tree, store).sha256) == 6
    assert compressor(pack_rootfs(tree, store, compression="gzip").sha256) == 1


# ---------------------------------------------------------------- 2. tarball


@pytest.mark.parametrize("suffix, mode", [(".tar.gz", "w:gz"), (".tar", "w"), (".tar.xz", "w:xz")])
def test_tarball_keeps_contents_modes_and_links(
    tmp_path: Path, store: ObjectStore, suffix: str, mode: str
) -> None:
    archive = tmp_path / f"rootfs{suffix}"
    archive.write_bytes(
        tar_bytes(
            [
                ("usr", "dir", 0o755),
                ("usr/bin", "dir", 0o755),
                ("usr/bin/tool", "file", (b"#!/bin/sh\nexit 0\n", 0o755)),
                ("usr/bin/su", "file", (b"setuid", 0o4755)),
                ("usr/bin/link-to-tool", "sym", "tool"),
                ("usr/bin/hard-to-tool", "hard", "usr/bin/tool"),
                ("bin", "sym", "usr/bin"),
                ("etc", "dir", 0o755),
                ("etc/motd", "file", b"hello\n"),
                ("etc/localtime", "sym", "/usr/share/zoneinfo/UTC"),
                ("tmp", "dir", 0o1777),
            ],
            mode=mode,
        )
    )

    packed = pack_rootfs(archive, store)
    image = object_path(store, packed)
    entries = listing(image)
    assert entries["usr/bin/tool"][0] == "-rwxr-xr-x"
    assert entries["etc/motd"][0] == "-rw-r--r--"
    assert entries["usr/bin/su"][0] == "-rwsr-xr-x"
    assert entries["tmp"][0] == "drwxrwxrwt"
    assert entries["usr/bin/link-to-tool"][0].startswith("l")
    assert entries["usr/bin/link-to-tool"][2] == "tool"
    assert entries["bin"][2] == "usr/bin"
    assert entries["etc/localtime"][2] == "/usr/share/zoneinfo/UTC"  # absolute links kept

    out = unsquash(image, tmp_path / "check")
    tool = out / "usr" / "bin" / "tool"
    assert tool.read_bytes() == b"#!/bin/sh\nexit 0\n"
    assert stat.S_IMODE(tool.stat().st_mode) == 0o755
    assert (out / "usr" / "bin" / "hard-to-tool").read_bytes() == tool.read_bytes()
    assert os.readlink(out / "usr" / "bin" / "link-to-tool") == "tool"
    assert (out / "etc" / "motd").read_text() == "hello\n"

    # The scratch tree is gone; the same tarball gives the same object.
    assert list(store.tmp.iterdir()) == []
    assert pack_rootfs(archive, store) == packed


# ---------------------------------------------------------------- 3. traversal


ESCAPES: dict[str, list[tuple[str, str, Any]]] = {
    "dotdot": [("../evil", "file", b"x")],
    "dotdot-deep": [("a/../../evil", "file", b"x")],
    "absolute": [("/etc/evil", "file", b"x")],
    "through-symlink": [("link", "sym", "/"), ("link/evil", "file", b"x")],
    "through-relative-symlink": [("link", "sym", "../../.."), ("link/evil", "file", b"x")],
}


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_tarball_path_traversal_is_refused(tmp_path: Path, store: ObjectStore, case: str) -> None:
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(tar_bytes([("ok", "file", b"fine"), *ESCAPES[case]]))

    with pytest.raises(SpecError, match=r"outside the image|which is not a directory"):
        pack_rootfs(archive, store)
    no_leftovers(store)
    assert files_named(tmp_path, "evil") == []
    for outside in ("/evil", "/etc/evil", "/tmp/evil"):
        assert not os.path.lexists(outside)


def test_a_member_replaces_a_symlink_of_its_name(tmp_path: Path, store: ObjectStore) -> None:
    """A later member of a symlink's name replaces the link; it never writes through it."""
    archive = tmp_path / "replace.tar"
    target = tmp_path / "host-file"
    target.write_bytes(b"host")
    archive.write_bytes(
        tar_bytes([("evil", "sym", str(target)), ("evil", "file", (b"x", 0o600))], mode="w")
    )

    entries = listing(object_path(store, pack_rootfs(archive, store)))
    assert entries["evil"][0] == "-rw-------"
    assert target.read_bytes() == b"host"
    assert list(store.tmp.iterdir()) == []


@pytest.mark.parametrize("absolute", [True, False])
def test_hard_link_to_a_host_file_is_refused(
    tmp_path: Path, store: ObjectStore, absolute: bool
) -> None:
    """A hard link out of the tree would copy a host file into the image, and a
    later member of the same name would write through it into the host file."""
    victim = tmp_path / "host-secret"
    victim.write_bytes(b"secret")
    victim.chmod(0o600)
    os.utime(victim, (1_000_000, 1_000_000))
    before = victim.stat()
    target = str(victim) if absolute else "../" * 12 + str(victim).lstrip("/")
    archive = tmp_path / "bad.tar"
    archive.write_bytes(
        tar_bytes([("stolen", "hard", target), ("stolen", "file", (b"pwned", 0o777))], mode="w")
    )

    with pytest.raises(SpecError, match=r"hard link 'stolen' to .*: outside the image"):
        pack_rootfs(archive, store)
    no_leftovers(store)

    after = victim.stat()
    assert victim.read_bytes() == b"secret"
    assert (after.st_mode, after.st_nlink, after.st_mtime) == (
        before.st_mode,
        before.st_nlink,
        before.st_mtime,
    )


def test_hard_link_to_a_missing_member_is_a_spec_error(tmp_path: Path, store: ObjectStore) -> None:
    archive = tmp_path / "dangling.tar"
    archive.write_bytes(tar_bytes([("h", "hard", "not/in/archive")], mode="w"))
    with pytest.raises(SpecError, match="hard link 'h' to 'not/in/archive': no such file"):
        pack_rootfs(archive, store)
    no_leftovers(store)


# ---------------------------------------------------------------- 4. OCI layout


def _blob(layout: Path, data: bytes) -> dict[str, Any]:
    hexd = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / hexd
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": f"sha256:{hexd}", "size": len(data)}


def make_oci(
    layout: Path,
    layers: list[bytes],
    config: dict[str, Any],
    tags: tuple[str | None, ...] = ("1.0",),
) -> dict[str, str]:
    """An OCI image layout with one manifest per tag; returns digests by role."""
    layout.mkdir(parents=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    layer_descs = [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **_blob(layout, tar)}
        for tar in layers
    ]
    config_desc = {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        **_blob(
            layout,
            json.dumps(
                {
                    "architecture": "amd64",
                    "os": "linux",
                    "config": config,
                    "rootfs": {"type": "layers", "diff_ids": []},
                }
            ).encode(),
        ),
    }
    manifests = []
    for i, tag in enumerate(tags):
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc,
            "layers": layer_descs,
            "annotations": {"n": str(i)},  # distinct manifests per tag
        }
        desc = {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            **_blob(layout, json.dumps(manifest).encode()),
        }
        if tag is not None:
            desc["annotations"] = {REF_NAME: tag}
        manifests.append(desc)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))
    return {
        "manifest": manifests[0]["digest"],
        "config": config_desc["digest"],
        "layer1": layer_descs[0]["digest"],
        "layer2": layer_descs[-1]["digest"],
    }


LAYER1 = [
    ("etc", "dir", 0o755),
    ("etc/keep", "file", b"keep\n"),
    ("etc/gone", "file", b"gone\n"),
    ("cache", "dir", 0o755),
    ("cache/a", "file", b"a"),
    ("cache/sub", "dir", 0o755),
    ("cache/sub/b", "file", b"b"),
    ("bin", "dir", 0o755),
    ("bin/app", "file", (b"#!/bin/sh\n", 0o755)),
    ("lib", "sym", "/usr/lib"),
]
LAYER2 = [
    ("etc/.wh.gone", "file", b""),
    ("cache/.wh..wh..opq", "file", b""),
    ("cache/new", "file", b"new"),
    ("etc/added", "file", b"added\n"),
    ("etc/keep", "file", b"kept, v2\n"),
]
CONFIG = {
    "Entrypoint": ["/bin/app", "--serve"],
    "Cmd": ["--port", "8080"],
    "Env": ["PATH=/usr/bin:/bin", "OPTS=a=b"],
    "WorkingDir": "/srv",
    "User": "1000:100",
}


def gz(entries: list[tuple[str, str, Any]]) -> bytes:
    return gzip.compress(tar_bytes(entries, mode="w"), mtime=0)


def test_oci_layout_applies_layers_whiteouts_and_config(tmp_path: Path, store: ObjectStore) -> None:
    layout = tmp_path / "oci"
    make_oci(layout, [gz(LAYER1), gz(LAYER2)], CONFIG)

    packed = pack_rootfs(layout, store, tag="1.0")
    image = object_path(store, packed)
    entries = listing(image)
    assert sorted(entries) == [
        "/",
        "bin",
        "bin/app",
        "cache",
        "cache/new",
        "etc",
        "etc/added",
        "etc/keep",
        "lib",
    ]
    assert not any(".wh." in name for name in entries)
    assert entries["bin/app"][0] == "-rwxr-xr-x"
    assert entries["lib"][2] == "/usr/lib"
    out = unsquash(image, tmp_path / "check")
    assert (out / "etc" / "keep").read_text() == "kept, v2\n"
    assert (out / "etc" / "added").read_text() == "added\n"
    assert (out / "cache" / "new").read_text() == "new"

    assert packed.config.args == ["/bin/app", "--serve", "--port", "8080"]
    assert packed.config.env == {"PATH": "/usr/bin:/bin", "OPTS": "a=b"}
    assert packed.config.cwd == "/srv"
    assert packed.config.user == "1000:100"

    # The only manifest is picked without a tag too, into the same object.
    assert pack_rootfs(layout, store) == packed
    assert stored(store) == [packed.sha256]


def test_oci_layout_tag_selection(tmp_path: Path, store: ObjectStore) -> None:
    layout = tmp_path / "oci"
    make_oci(layout, [gz(LAYER1), gz(LAYER2)], CONFIG, tags=("1.0", "latest"))

    assert pack_rootfs(layout, store, tag="latest") == pack_rootfs(layout, store, tag="1.0")
    with pytest.raises(SpecError, match=r"does not hold tag '2\.0'"):
        pack_rootfs(layout, store, tag="2.0")
    with pytest.raises(SpecError, match="exactly one image"):
        pack_rootfs(layout, store)  # two manifests and no tag
    assert len(stored(store)) == 1


@pytest.mark.parametrize("which", ["layer1", "layer2", "config", "manifest"])
def test_oci_layout_corrupt_blob_is_refused(tmp_path: Path, store: ObjectStore, which: str) -> None:
    layout = tmp_path / "oci"
    digests = make_oci(layout, [gz(LAYER1), gz(LAYER2)], CONFIG)
    blob = layout / "blobs" / "sha256" / digests[which].removeprefix("sha256:")
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))

    with pytest.raises(SpecError, match=rf"blob {digests[which]} is corrupt"):
        pack_rootfs(layout, store, tag="1.0")
    no_leftovers(store)


def test_oci_layout_missing_blob_is_refused(tmp_path: Path, store: ObjectStore) -> None:
    layout = tmp_path / "oci"
    digests = make_oci(layout, [gz(LAYER1), gz(LAYER2)], CONFIG)
    (layout / "blobs" / "sha256" / digests["layer2"].removeprefix("sha256:")).unlink()
    with pytest.raises(SpecError, match="missing blob"):
        pack_rootfs(layout, store)
    no_leftovers(store)


@pytest.mark.parametrize(
    "whiteout", [".wh...", ".wh..", "sub/.wh...", "../.wh.x", "/etc/.wh.passwd", "./.wh..."]
)
def test_oci_whiteout_cannot_reach_outside_the_tree(
    tmp_path: Path, store: ObjectStore, whiteout: str
) -> None:
    (tmp_path / "sibling").write_text("beside the tree")
    layout = tmp_path / "oci"
    make_oci(
        layout,
        [gz([("sub", "dir", 0o755), ("sub/kept", "file", b"kept")]), gz([(whiteout, "file", b"")])],
        {},
    )

    with pytest.raises(SpecError, match="outside the image"):
        pack_rootfs(layout, store)
    no_leftovers(store)
    assert (tmp_path / "sibling").read_text() == "beside the tree"
    assert Path("/etc/passwd").exists()


def test_oci_hard_links_outlive_their_target_and_dirs_merge(
    tmp_path: Path, store: ObjectStore
) -> None:
    """As layers extracted one over the other made it: a hard link keeps the file it
    named when its target is deleted or replaced; a directory over a directory keeps
    the children and takes the new mode; a file over a directory replaces it all."""
    lower = [
        ("gone", "file", b"v1 of gone"),
        ("keeps-gone", "hard", "gone"),
        ("replaced", "file", b"v1 of replaced"),
        ("keeps-replaced", "hard", "replaced"),
        ("shared", "file", b"both"),
        ("also-shared", "hard", "shared"),
        ("dir", "dir", 0o755),
        ("dir/child", "file", b"child"),
        ("was-dir", "dir", 0o755),
        ("was-dir/deep", "dir", 0o755),
        ("was-dir/deep/file", "file", b"x"),
    ]
    upper = [
        (".wh.gone", "file", b""),
        ("replaced", "file", b"v2 of replaced"),
        ("dir", "dir", 0o700),
        ("was-dir", "file", b"now a file"),
    ]
    make_oci(tmp_path / "oci", [gz(lower), gz(upper)], {})

    image = object_path(store, pack_rootfs(tmp_path / "oci", store))
    entries = listing(image)
    assert sorted(entries) == [
        "/", "also-shared", "dir", "dir/child", "keeps-gone", "keeps-replaced",
        "replaced", "shared", "was-dir",
    ]  # fmt: skip
    assert entries["dir"][0] == "drwx------"
    out = unsquash(image, tmp_path / "check")
    assert (out / "keeps-gone").read_bytes() == b"v1 of gone"
    assert (out / "keeps-replaced").read_bytes() == b"v1 of replaced"
    assert (out / "replaced").read_bytes() == b"v2 of replaced"
    assert (out / "was-dir").read_bytes() == b"now a file"
    assert (out / "dir" / "child").read_bytes() == b"child"
    assert os.stat(out / "shared").st_ino == os.stat(out / "also-shared").st_ino


def test_tarball_times_and_names_of_owners_do_not_change_the_object(
    tmp_path: Path, store: ObjectStore
) -> None:
    entries = [("etc", "dir", 0o755), ("etc/motd", "file", b"hi\n")]
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    first.write_bytes(tar_bytes(entries, mode="w"))
    with tarfile.open(second, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, arg in entries:
            info = tarfile.TarInfo(name)
            info.mtime, info.uname, info.gname = 1_234_567_890.5, "someone", "staff"
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, arg
                tf.addfile(info)
            else:
                info.size, info.mode = len(arg), 0o644
                tf.addfile(info, io.BytesIO(arg))

    assert pack_rootfs(first, store) == pack_rootfs(second, store)
    assert len(stored(store)) == 1


# ---------------------------------------------------------------- 5. squashfs as is


@pytest.mark.parametrize("name", ["image.squashfs", "image.sqfs", "image.bin"])
def test_squashfs_file_is_stored_as_is(tmp_path: Path, store: ObjectStore, name: str) -> None:
    src = tmp_path / name
    subprocess.run(
        ["mksquashfs", str(make_tree(tmp_path / "tree")), str(src), "-quiet", "-no-progress"],
        check=True,
        capture_output=True,
    )
    packed = pack_rootfs(src, store)
    assert packed.sha256 == sha256_file(src)
    assert packed.size == src.stat().st_size
    assert store.path(packed.sha256).read_bytes() == src.read_bytes()
    assert stored(store) == [packed.sha256]


# ---------------------------------------------------------------- 6. bad sources


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("junk.bin", os.urandom(4096), "not a directory, tarball"),
        ("junk.tar.gz", b"\x1f\x8b but not really gzip" * 10, "not a readable tarball"),
        ("junk.tar", b"not a tar header " * 64, "not a readable tarball"),
        ("empty.img", b"", "not a directory, tarball"),
    ],
)
def test_garbage_source_is_a_spec_error(
    tmp_path: Path, store: ObjectStore, name: str, data: bytes, message: str
) -> None:
    src = tmp_path / name
    src.write_bytes(data)
    with pytest.raises(SpecError, match=message):
        pack_rootfs(src, store)
    no_leftovers(store)


def test_missing_source_is_a_spec_error(tmp_path: Path, store: ObjectStore) -> None:
    with pytest.raises(SpecError, match="no such file or directory"):
        pack_rootfs(tmp_path / "nowhere", store)
    no_leftovers(store)


# ---------------------------------------------------------------- 7. spec.build


SPEC = """\
revision: 3
description: test revision
expires: {expires}
containers:
  app:
    rootfs: {{dir: rootfs/app, all_root: true}}
    args: [/bin/app]
    stop_timeout_ms: 2s
    restart: {{policy: always, backoff_initial_ms: 500ms, backoff_max_ms: 30s}}
    cgroup: {{memory_max: 64M, pids_max: 32}}
"""


@pytest.mark.parametrize(
    "expires",
    [
        "2030-01-02 03:04:05",  # naive: taken as UTC
        "2030-01-02T03:04:05Z",
        "2030-01-02T05:04:05+02:00",
        "2030-01-01 22:04:05.75 -5",
    ],
)
def test_build_converts_units_and_packs_the_rootfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, expires: str
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    make_tree(tmp_path / "spec" / "rootfs" / "app")
    spec = tmp_path / "spec" / "spec.yaml"
    spec.write_text(SPEC.format(expires=expires))
    out = tmp_path / "rev"

    result = build(spec, out)
    doc = json.loads((out / "state.json").read_text())
    assert doc["revision"] == 3
    assert doc["expires"] == "2030-01-02T03:04:05Z"
    assert doc["created"] == "2023-11-14T22:13:20Z"
    app = doc["containers"]["app"]
    assert app["stop_timeout_ms"] == 2000
    assert app["restart"]["backoff_initial_ms"] == 500
    assert app["restart"]["backoff_max_ms"] == 30_000
    assert app["cgroup"]["memory_max"] == 64 * 1024 * 1024
    assert app["cgroup"]["pids_max"] == 32
    assert app["args"] == ["/bin/app"]

    objects = ObjectStore(out / "objects")
    rootfs = app["rootfs"]
    assert rootfs["format"] == "squashfs"
    assert stored(objects) == [rootfs["sha256"]]
    image = objects.path(rootfs["sha256"])
    assert sha256_file(image) == rootfs["sha256"]
    assert image.stat().st_size == rootfs["size"]
    entries = listing(image)
    assert "bin/app" in entries
    assert {owner for _mode, owner, _ in entries.values()} == {"0/0"}  # all_root: true
    assert result.objects_added == 1
    assert result.state.revision == 3

    # Building again into the same dir adds nothing and gives the same bytes.
    before = (out / "state.json").read_bytes()
    assert build(spec, out).objects_added == 0
    assert (out / "state.json").read_bytes() == before


def test_build_fills_run_config_from_an_oci_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    config = {**CONFIG, "StopSignal": "SIGRTMIN+3"}
    make_oci(tmp_path / "images" / "web", [gz(LAYER1), gz(LAYER2)], config, tags=("1.0", "2.0"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "revision: 1\n"
        "containers:\n"
        "  web:\n"
        "    rootfs: {oci: images/web, tag: '2.0', compression: xz}\n"
        "    env: {OPTS: mine}\n"
        "  own:\n"
        "    rootfs: {oci: images/web, tag: '2.0', compression: xz}\n"
        "    stop_signal: INT\n"
    )
    build(spec, tmp_path / "rev")
    web = json.loads((tmp_path / "rev" / "state.json").read_text())["containers"]["web"]
    assert web["args"] == ["/bin/app", "--serve", "--port", "8080"]
    assert web["env"] == {"PATH": "/usr/bin:/bin", "OPTS": "mine"}  # the spec wins
    assert web["cwd"] == "/srv"
    assert web["user"] == {"uid": 1000, "gid": 100}
    assert web["stop_signal"] == "RTMIN+3"  # the image's StopSignal, in the state's names
    own = json.loads((tmp_path / "rev" / "state.json").read_text())["containers"]["own"]
    assert own["stop_signal"] == "INT"  # the spec wins


def test_build_typo_fails_before_packing(tmp_path: Path) -> None:
    make_tree(tmp_path / "rootfs" / "app")
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "revision: 1\n"
        "containers:\n"
        "  app:\n"
        "    rootfs: rootfs/app\n"
        "    args: [/bin/app]\n"
        "    restartt: {policy: always}\n"
    )
    out = tmp_path / "rev"

    with pytest.raises(ManifestError) as info:
        build(spec, out)
    assert info.value.path == "$.containers.app"
    assert str(info.value).startswith("$.containers.app: ")
    assert "restartt" in str(info.value)
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize(
    "text, where",
    [
        ("revision: 1\ncontainers:\n  app:\n    args: [/bin/app\n    rootfs: x\n", "line 5"),
        ("revision: 1\ncontainers:\n\tapp: {}\n", "line 3"),
    ],
)
def test_build_invalid_yaml_names_the_line(tmp_path: Path, text: str, where: str) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    with pytest.raises(SpecError, match=f"spec.yaml: {where}: invalid YAML"):
        build(spec, tmp_path / "rev")
    assert not (tmp_path / "rev").exists()


@pytest.mark.parametrize(
    "field, value, path",
    [
        (
            "restart: {backoff_max_ms: 30 parsecs}",
            "30 parsecs",
            "$.containers.app.restart.backoff_max_ms",
        ),
        ("cgroup: {memory_max: lots}", "lots", "$.containers.app.cgroup.memory_max"),
    ],
)
def test_build_bad_unit_names_the_path(tmp_path: Path, field: str, value: str, path: str) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"revision: 1\ncontainers:\n  app:\n    rootfs: r\n    args: [/a]\n    {field}\n"
    )
    with pytest.raises(SpecError) as info:
        build(spec, tmp_path / "rev")
    assert info.value.path == path
    assert repr(value) in str(info.value)


# ---------------------------------------------------------------- 8. hostile archives, CLI


def pvpy(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``pvpy`` as a user runs it (tests/test_cli.py's way)."""
    return subprocess.run(
        [sys.executable, "-m", "pvpy", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "PVPY_DEBUG": ""},
        timeout=300,
    )


def build_fails(spec: Path, out: Path, code: int = 4) -> str:
    """``pvpy state build`` fails with ``code`` and one line, and leaves nothing in ``out``."""
    result = pvpy("state", "build", spec, "--out", out)
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pvpy: error: "), result.stderr
    assert not (out / "state.json").exists()
    left = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert left == []
    return lines[0]


CHAIN_STEPS = "abcdefghijklmnop"


def path_max_chain(
    outside: Path, *, whole: bool
) -> list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]]:
    """CVE-2025-4517's members: 16 symlinks, each to a directory of 247 characters, so
    that "a/b/.../p/lll..." resolves past PATH_MAX and non-strict realpath goes on
    lexically, taking the last link ("l"*254, really the top) for a directory. The
    kernel follows "escape" to ``outside``; realpath believes it stays in the tree.
    ``whole``: with that last link (made through the chain) and members written and
    replaced through "escape"; else the links alone, none of them used as a directory.
    """
    long_dir = "d" * 247
    members: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]] = []
    path = ""
    for step in CHAIN_STEPS:
        directory = tarfile.TarInfo(os.path.join(path, long_dir))
        directory.type, directory.mode = tarfile.DIRTYPE, 0o755
        link = tarfile.TarInfo(os.path.join(path, step))
        link.type, link.linkname = tarfile.SYMTYPE, long_dir
        members += [directory, link]
        path = os.path.join(path, long_dir)
    top = tarfile.TarInfo(os.path.join(*CHAIN_STEPS, "l" * 254))
    top.type, top.linkname = tarfile.SYMTYPE, os.path.join(*[".."] * len(CHAIN_STEPS))
    escape = tarfile.TarInfo("escape")
    escape.type = tarfile.SYMTYPE
    escape.linkname = top.name + "/.." * (len(CHAIN_STEPS) + 1) + str(outside)
    if whole:
        members.append(top)
    members.append(escape)
    if whole:
        members += through_escape()
    return members


def through_escape() -> list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]]:
    written = tarfile.TarInfo("escape/escaped")
    written.size = 7
    replaced = tarfile.TarInfo("escape/sentinel")  # tarfile unlinked what was there first
    replaced.type, replaced.linkname = tarfile.SYMTYPE, "gone"
    return [(written, b"escaped"), replaced]


def tar_of(members: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for item in members:
            info, data = item if isinstance(item, tuple) else (item, None)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the build with a sentinel file that must survive it."""
    place = tmp_path / "outside"
    place.mkdir()
    (place / "sentinel").write_text("keep me")
    return place


def assert_untouched(outside: Path) -> None:
    assert sorted(os.listdir(outside)) == ["sentinel"]
    assert not (outside / "sentinel").is_symlink()
    assert (outside / "sentinel").read_text() == "keep me"


def assert_escape_is_just_a_link(out: Path, outside: Path) -> None:
    doc = json.loads((out / "state.json").read_text())
    image = ObjectStore(out / "objects").path(doc["containers"]["app"]["rootfs"]["sha256"])
    entries = listing(image)
    assert entries["escape"][0].startswith("l")
    assert entries["escape"][2].startswith("a/b/c/")
    assert entries["escape"][2].endswith(str(outside))
    assert not any(name.startswith("escape/") for name in entries)


CHAIN_REFUSED = "lies under 'a', which is not a directory"  # "a/b/.../lll" goes through "a"


@pytest.mark.parametrize("whole", [True, False], ids=["write-through", "links-only"])
def test_path_max_symlink_chain_in_a_tarball_cannot_escape(
    tmp_path: Path, outside: Path, whole: bool
) -> None:
    (tmp_path / "evil.tar").write_bytes(tar_of(path_max_chain(outside, whole=whole)))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "revision: 1\ncontainers:\n  app:\n    rootfs: {tar: evil.tar}\n    args: [/a]\n"
    )
    out = tmp_path / "rev"

    if whole:
        assert CHAIN_REFUSED in build_fails(spec, out)
    else:
        result = pvpy("state", "build", spec, "--out", out)
        assert result.returncode == 0, result.stderr
        assert_escape_is_just_a_link(out, outside)
    assert_untouched(outside)


@pytest.mark.parametrize("whole", [True, False], ids=["write-through", "whiteout-only"])
def test_path_max_symlink_chain_in_an_oci_layer_cannot_escape(
    tmp_path: Path, outside: Path, whole: bool
) -> None:
    """The upper layer deletes through "escape" with a whiteout (the old code checked
    its parent with realpath) and, whole, writes through it too."""
    upper: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]] = [
        tarfile.TarInfo("escape/.wh.sentinel")
    ]
    if whole:
        upper += through_escape()
    layers = [tar_of(path_max_chain(outside, whole=whole)), tar_of(upper)]
    make_oci(tmp_path / "oci", [gzip.compress(layer, mtime=0) for layer in layers], {})
    spec = tmp_path / "spec.yaml"
    spec.write_text("revision: 1\ncontainers:\n  app:\n    rootfs: {oci: oci}\n    args: [/a]\n")
    out = tmp_path / "rev"

    if whole:
        assert CHAIN_REFUSED in build_fails(spec, out)
    else:
        result = pvpy("state", "build", spec, "--out", out)
        assert result.returncode == 0, result.stderr
        assert_escape_is_just_a_link(out, outside)
    assert_untouched(outside)


# ---------------------------------------------------------------- 9. broken sources, CLI


def _rewrite_blob(layout: Path, digest: str, data: bytes) -> str:
    """Replace the blob ``digest`` by ``data`` under its own (correct) digest, and
    point every manifest and index at it; returns the new digest."""
    new = str(_blob(layout, data)["digest"])
    for path in [layout / "index.json", *(layout / "blobs" / "sha256").iterdir()]:
        if path.is_file() and digest.encode() in path.read_bytes():
            text = path.read_bytes().replace(digest.encode(), new.encode())
            if path.name == "index.json":
                path.write_bytes(text)
            else:  # a manifest: store it again under its new digest
                new_manifest = _rewrite_blob(layout, "sha256:" + path.name, text)
                assert new_manifest
    return new


def _truncate(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


def _flip(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


def _xz(entries: list[tuple[str, str, Any]]) -> bytes:
    return lzma.compress(tar_bytes(entries, mode="w"))


def _break_index(layout: Path, digests: dict[str, str], text: str) -> None:
    (layout / "index.json").write_text(text.replace("MANIFEST", digests["manifest"]))


def _break_manifest(layout: Path, digests: dict[str, str], edit: str) -> None:
    path = layout / "blobs" / "sha256" / digests["manifest"].removeprefix("sha256:")
    manifest = json.loads(path.read_text())
    if edit == "layers-not-a-list":
        manifest["layers"] = {"a": 1}
    elif edit == "layer-not-a-descriptor":
        manifest["layers"] = ["sha256:" + "0" * 64]
    elif edit == "no-config":
        del manifest["config"]
    elif edit == "layer-digest-not-a-string":
        manifest["layers"][0]["digest"] = 12
    _rewrite_blob(layout, digests["manifest"], json.dumps(manifest).encode())


def _blob_to_directory(layout: Path, digest: str) -> None:
    path = layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
    path.unlink()
    path.mkdir()


def _break_config(layout: Path, digests: dict[str, str], text: str) -> None:
    _rewrite_blob(layout, digests["config"], text.encode())


BROKEN_OCI: dict[str, Callable[[Path, dict[str, str]], object]] = {
    "index-not-json": lambda lay, d: _break_index(lay, d, "{not json"),
    "index-not-utf8": lambda lay, d: (lay / "index.json").write_bytes(b'{"manifests": "\xff"}'),
    "index-a-list": lambda lay, d: _break_index(lay, d, "[]"),
    "index-no-manifests": lambda lay, d: _break_index(lay, d, '{"schemaVersion": 2}'),
    "index-manifests-not-objects": lambda lay, d: _break_index(lay, d, '{"manifests": [1]}'),
    "index-manifest-without-digest": lambda lay, d: _break_index(lay, d, '{"manifests": [{}]}'),
    "digest-not-sha256": lambda lay, d: _break_index(
        lay, d, '{"manifests": [{"digest": "md5:0123"}]}'
    ),
    "digest-not-hex": lambda lay, d: _break_index(
        lay, d, '{"manifests": [{"digest": "sha256:' + "Z" * 64 + '"}]}'
    ),
    "manifest-missing": lambda lay, d: (
        lay / "blobs" / "sha256" / d["manifest"].removeprefix("sha256:")
    ).unlink(),
    "manifest-a-directory": lambda lay, d: _blob_to_directory(lay, d["manifest"]),
    "manifest-layers-not-a-list": lambda lay, d: _break_manifest(lay, d, "layers-not-a-list"),
    "manifest-layer-not-a-descriptor": lambda lay, d: _break_manifest(
        lay, d, "layer-not-a-descriptor"
    ),
    "manifest-layer-digest-not-a-string": lambda lay, d: _break_manifest(
        lay, d, "layer-digest-not-a-string"
    ),
    "manifest-no-config": lambda lay, d: _break_manifest(lay, d, "no-config"),
    "config-a-list": lambda lay, d: _break_config(lay, d, "[]"),
    "config-env-a-string": lambda lay, d: _break_config(lay, d, '{"config": {"Env": "A=1"}}'),
    "config-cmd-not-strings": lambda lay, d: _break_config(lay, d, '{"config": {"Cmd": [1]}}'),
    "layer-missing": lambda lay, d: (
        lay / "blobs" / "sha256" / d["layer2"].removeprefix("sha256:")
    ).unlink(),
    "layer-corrupt": lambda lay, d: (
        lay / "blobs" / "sha256" / d["layer1"].removeprefix("sha256:")
    ).write_bytes(b"not what was hashed"),
    "layer-truncated-gzip": lambda lay, d: _rewrite_blob(lay, d["layer1"], _truncate(gz(LAYER1))),
    "layer-corrupt-gzip": lambda lay, d: _rewrite_blob(lay, d["layer1"], _flip(gz(LAYER1))),
    "layer-truncated-xz": lambda lay, d: _rewrite_blob(lay, d["layer1"], _truncate(_xz(LAYER1))),
    "layer-corrupt-xz": lambda lay, d: _rewrite_blob(lay, d["layer1"], _flip(_xz(LAYER1))),
    "layer-not-a-tarball": lambda lay, d: _rewrite_blob(
        lay, d["layer2"], gzip.compress(b"no tar here" * 100)
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_OCI))
def test_broken_oci_layout_is_one_line_and_exit_4(tmp_path: Path, case: str) -> None:
    layout = tmp_path / "oci"
    digests = make_oci(layout, [gz(LAYER1), gz(LAYER2)], CONFIG)
    BROKEN_OCI[case](layout, digests)
    spec = tmp_path / "spec.yaml"
    spec.write_text("revision: 1\ncontainers:\n  app:\n    rootfs: {oci: oci}\n    args: [/a]\n")

    line = build_fails(spec, tmp_path / "rev")
    assert line.startswith("pvpy: error: $.containers.app.rootfs: ")


BROKEN_TARBALLS: dict[str, Callable[[], bytes]] = {
    "rootfs.tar.gz": lambda: _truncate(gz(LAYER1)),
    "corrupt.tar.gz": lambda: _flip(gz(LAYER1)),
    "rootfs.tar.xz": lambda: _truncate(_xz(LAYER1)),
    "corrupt.tar.xz": lambda: _flip(_xz(LAYER1)),
    "rootfs.tar.bz2": lambda: _truncate(tar_bytes(LAYER1, mode="w:bz2")),
    "cut-in-data.tar": lambda: tar_bytes([("big", "file", os.urandom(4096))], mode="w")[:2048],
    "empty.tar": lambda: b"",
}


@pytest.mark.parametrize("name", sorted(BROKEN_TARBALLS))
def test_broken_tarball_is_one_line_and_exit_4(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(BROKEN_TARBALLS[name]())
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"revision: 1\ncontainers:\n  app:\n    rootfs: {{tar: {name}}}\n    args: [/a]\n"
    )

    line = build_fails(spec, tmp_path / "rev")
    assert f"{name}: not a readable tarball" in line


# ---------------------------------------------------------------- 8. image intent
# (images made by real tools: tests/test_oci_images.py; here each rule on its own)

PASSWD = b"# comment\nroot:x:0:0:root:/root:/bin/sh\n+nis\nbroken:x:a:b::/:\napp:x:1000:1000::/home/app:/bin/sh\n"
GROUP = b"root:x:0:\nstaff:x:50:app\napp:x:1000:\n"
ACCOUNTS = ImageAccounts(PASSWD, GROUP)


@pytest.mark.parametrize(
    ("user", "ids"),
    [
        ("app", (1000, 1000)),  # the primary group of /etc/passwd
        ("app:staff", (1000, 50)),
        ("app:7", (1000, 7)),
        ("1000", (1000, 1000)),  # a listed uid takes its primary group too
        ("4242", (4242, 0)),  # an unlisted uid: group 0, as runc does
        ("4242:staff", (4242, 50)),
        ("0:0", (0, 0)),
    ],
)
def test_user_resolves_through_the_images_own_accounts(user: str, ids: tuple[int, int]) -> None:
    assert resolve_user(user, ACCOUNTS, "img") == ids


@pytest.mark.parametrize(
    ("user", "accounts", "message"),
    [
        ("bob", ACCOUNTS, "img: user 'bob': no user 'bob' in the image's /etc/passwd"),
        (
            "app:wheel",
            ACCOUNTS,
            "img: user 'app:wheel': no group 'wheel' in the image's /etc/group",
        ),
        ("app", ImageAccounts(), "no user 'app' in the image's /etc/passwd (it has none)"),
        ("broken", ACCOUNTS, "no user 'broken'"),  # a malformed entry is no entry
        ("app:", ACCOUNTS, "not NAME, UID, NAME:GROUP or UID:GID"),
        ("app", None, "names need an image pvpy reads"),
        ("4294967295", ACCOUNTS, "ids go up to 4294967294"),
    ],
)
def test_a_user_that_does_not_resolve_is_a_spec_error(
    user: str, accounts: ImageAccounts | None, message: str
) -> None:
    with pytest.raises(SpecError, match=re.escape(message)):
        resolve_user(user, accounts, "img")


def test_accounts_are_read_through_symlinks_inside_the_image(
    tmp_path: Path, store: ObjectStore
) -> None:
    # /etc/passwd -> /usr/lib/passwd (absolute: inside the image, never the host's),
    # /etc/group -> ../usr/lib/group; a later layer replaces the passwd it points at
    lower = [
        ("etc", "dir", 0o755),
        ("usr/lib", "dir", 0o755),
        ("usr/lib/passwd", "file", b"old:x:1:1::/:\n"),
        ("usr/lib/group", "file", GROUP),
        ("etc/passwd", "sym", "/usr/lib/passwd"),
        ("etc/group", "sym", "../usr/lib/../lib/../../../usr/lib/group"),
    ]
    upper = [("usr/lib/passwd", "file", PASSWD)]
    make_oci(tmp_path / "oci", [gz(lower), gz(upper)], {"User": "app:staff"})
    packed = pack_rootfs(tmp_path / "oci", store)
    assert packed.accounts == ImageAccounts(PASSWD, GROUP)
    assert packed.config.user == "app:staff"

    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "usr" / "lib").mkdir(parents=True)
    (tree / "usr" / "lib" / "passwd").write_bytes(PASSWD)
    (tree / "etc" / "passwd").symlink_to("/usr/lib/passwd")
    (tree / "etc" / "group").symlink_to("/etc/group")  # a loop: no group file
    assert pack_rootfs(tree, store).accounts == ImageAccounts(PASSWD, None)


def _config(**config: Any) -> dict[str, Any]:
    return {"architecture": "amd64", "os": "linux", "config": config}


@pytest.mark.parametrize(
    ("healthcheck", "shell", "readiness"),
    [
        (  # Docker's own form; durations in ns, rounded up to ms
            {"Test": ["CMD-SHELL", "curl -f localhost"], "Interval": 2_000_000_000,
             "Timeout": 1_500_000, "Retries": 3, "StartPeriod": 10**10},
            None,
            {"command": ["/bin/sh", "-c", "curl -f localhost"], "interval_ms": 2000, "timeout_ms": 2},
        ),
        (  # buildah's split CMD-SHELL is joined; the image's Shell runs it
            {"Test": ["CMD-SHELL", "test", "-e", "/ok"]},
            ["/bin/ash", "-eo", "pipefail", "-c"],
            {"command": ["/bin/ash", "-eo", "pipefail", "-c", "test -e /ok"],
             "interval_ms": 5000, "timeout_ms": 30000},  # Docker's defaults
        ),
        (  # StartInterval is how often to check while starting
            {"Test": ["CMD", "/bin/check", "--quick"], "Interval": 60 * 10**9,
             "StartInterval": 250_000_000},
            None,
            {"command": ["/bin/check", "--quick"], "interval_ms": 250, "timeout_ms": 30000},
        ),
        ({"Test": ["NONE"]}, None, None),
        ({"Test": []}, None, None),
    ],
)  # fmt: skip
def test_a_docker_healthcheck_becomes_a_command_readiness(
    healthcheck: dict[str, Any], shell: list[str] | None, readiness: dict[str, Any] | None
) -> None:
    extra = {"Shell": shell} if shell else {}
    config = run_config(_config(Healthcheck=healthcheck, **extra), "img")
    expected = {"type": "command", **readiness} if readiness else None
    assert config.readiness == expected


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"Healthcheck": {"Test": ["CMD"]}}, "Healthcheck.Test ['CMD'] is not"),
        ({"Healthcheck": {"Test": ["EXEC", "x"]}}, "Healthcheck.Test ['EXEC', 'x'] is not"),
        ({"Healthcheck": {"Test": "CMD true"}}, "Healthcheck.Test is not a list of strings"),
        ({"Healthcheck": {"Test": ["CMD", "x"], "Interval": -1}}, "Healthcheck.Interval is not"),
        ({"Healthcheck": {"Test": ["CMD", "x"], "Timeout": 1.5}}, "Healthcheck.Timeout is not"),
        ({"Volumes": {"data": {}}}, "volume 'data' is not an absolute path"),
        ({"Volumes": {"/a/../..": {}}}, "has '..'"),
        ({"Volumes": {"//": {}}}, "would hide the whole image"),
        ({"Volumes": ["/data"]}, "Volumes is not an object"),
        ({"User": 1000}, "User is not a string"),
    ],
)
def test_a_malformed_image_config_is_a_spec_error(config: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=re.escape(message)):
        run_config(_config(**config), "img")


def test_image_volumes_are_normalised_targets() -> None:
    config = run_config(_config(Volumes={"/var/lib/db/": {}, "/data": {}, "/x//y": {}}), "img")
    assert config.volumes == ("/data", "/var/lib/db", "/x/y")
