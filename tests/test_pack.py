"""pvpy.workstation.pack and pvpy.workstation.spec.build: sources become squashfs objects, checked with unsquashfs."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from pvpy.errors import ManifestError, SpecError
from pvpy.store import ObjectStore, sha256_file
from pvpy.workstation.pack import PackedImage, extract_tar, pack_rootfs
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


ESCAPES = {
    "dotdot": [("../evil", "file", b"x")],
    "dotdot-deep": [("a/../../evil", "file", b"x")],
    "absolute": [("/etc/evil", "file", b"x")],
    "through-symlink": [("link", "sym", "/"), ("link/evil", "file", b"x")],
    "through-relative-symlink": [("link", "sym", "../../.."), ("link/evil", "file", b"x")],
    "replace-symlink": [("evil", "sym", "/tmp/evil"), ("evil", "file", b"x")],
}


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_tarball_path_traversal_is_refused(tmp_path: Path, store: ObjectStore, case: str) -> None:
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(tar_bytes([("ok", "file", b"fine"), *ESCAPES[case]]))

    with pytest.raises(SpecError, match="cannot extract"):
        pack_rootfs(archive, store)
    no_leftovers(store)

    # Straight into a dest deep in tmp_path: nothing lands beside it either.
    dest = tmp_path / "a" / "b" / "c" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(SpecError):
        extract_tar(archive, dest)
    # (A symlink named evil inside dest is fine: it is part of the tree.)
    assert [p for p in files_named(tmp_path, "evil") if dest not in p.parents] == []
    for outside in ("/evil", "/etc/evil", "/tmp/evil"):
        assert not os.path.lexists(outside)


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
    dest = tmp_path / "x" / "dest"
    dest.mkdir(parents=True)
    target = str(victim) if absolute else "../" * 12 + str(victim).lstrip("/")
    archive = tmp_path / "bad.tar"
    archive.write_bytes(
        tar_bytes([("stolen", "hard", target), ("stolen", "file", (b"pwned", 0o777))], mode="w")
    )

    with pytest.raises(SpecError, match="cannot extract"):
        pack_rootfs(archive, store)
    no_leftovers(store)
    with pytest.raises(SpecError, match="outside the destination"):
        extract_tar(archive, dest)

    after = victim.stat()
    assert victim.read_bytes() == b"secret"
    assert (after.st_mode, after.st_nlink, after.st_mtime) == (
        before.st_mode,
        before.st_nlink,
        before.st_mtime,
    )
    assert not (dest / "stolen").exists()


def test_hard_link_to_a_missing_member_is_a_spec_error(tmp_path: Path, store: ObjectStore) -> None:
    archive = tmp_path / "dangling.tar"
    archive.write_bytes(tar_bytes([("h", "hard", "not/in/archive")], mode="w"))
    with pytest.raises(SpecError, match="cannot extract"):
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
    assert packed.config.user == (1000, 100)

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
    "whiteout", [".wh...", ".wh..", "sub/.wh...", "../.wh.x", "/etc/.wh.passwd"]
)
def test_oci_whiteout_cannot_reach_outside_the_tree(tmp_path: Path, whiteout: str) -> None:
    scratch = tmp_path / "scratch"
    dest = scratch / "dest"
    (dest / "sub").mkdir(parents=True)
    (dest / "sub" / "kept").write_text("kept")
    (scratch / "sibling").write_text("beside the tree")
    layer = io.BytesIO(tar_bytes([(whiteout, "file", b"")], mode="w"))

    with pytest.raises(SpecError, match="whiteout outside the image"):
        extract_tar(layer, dest, oci_whiteouts=True)
    assert (scratch / "sibling").read_text() == "beside the tree"
    assert (dest / "sub" / "kept").read_text() == "kept"
    assert Path("/etc/passwd").exists()


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
    make_oci(tmp_path / "images" / "web", [gz(LAYER1), gz(LAYER2)], CONFIG, tags=("1.0", "2.0"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "revision: 1\n"
        "containers:\n"
        "  web:\n"
        "    rootfs: {oci: images/web, tag: '2.0', compression: xz}\n"
        "    env: {OPTS: mine}\n"
    )
    build(spec, tmp_path / "rev")
    web = json.loads((tmp_path / "rev" / "state.json").read_text())["containers"]["web"]
    assert web["args"] == ["/bin/app", "--serve", "--port", "8080"]
    assert web["env"] == {"PATH": "/usr/bin:/bin", "OPTS": "mine"}  # the spec wins
    assert web["cwd"] == "/srv"
    assert web["user"] == {"uid": 1000, "gid": 100}


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
    assert not (out / "state.json").exists()
    objects = ObjectStore(out / "objects")
    assert stored(objects) == []
    assert [p.name for p in (out / "objects").iterdir()] in ([], [".tmp"])
    assert list(objects.tmp.iterdir()) == []


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
