"""The factory revision and the storage it is provisioned into; updates for an image.

``build_board_revision`` builds a spec for the board (its BSP added: kernel,
initramfs, command line, device tree) and signs it; the factory revision
(``build_revision``) and updates to an image (``build_update``, e.g. for
``pvpy device push``) both go through it. ``provision_storage`` then runs
pvpy's own provisioning (``pvpy.provision.provision``: it verifies the
revision) into the tree the storage partition is made from.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pvpy import _run, paths
from pvpy.errors import UsageError
from pvpy.log import get_logger
from pvpy.workstation.image.board import load_board
from pvpy.workstation.image.context import IMAGE_MANIFEST, ImageBuild, default_cache
from pvpy.workstation.image.packages import ensure_host_tools, extract_packages, fetch_packages

__all__ = ["build_board_revision", "build_revision", "build_update", "provision_storage"]

log = get_logger("image")


def _absolute_sources(doc: dict[str, Any], spec_dir: Path) -> None:
    """Make the spec's sources absolute, so the spec can be rewritten elsewhere."""

    def fix(value: Any) -> Any:
        if isinstance(value, str):
            return str(spec_dir / value)
        if isinstance(value, dict):
            return {k: str(spec_dir / v) if k in ("dir", "tar", "oci", "file", "squashfs")
                    and isinstance(v, str) else v for k, v in value.items()}  # fmt: skip
        return value

    bsp = doc.get("bsp")
    if isinstance(bsp, dict):
        for key in ("kernel", "initrd", "dtb", "modules", "firmware"):
            if key in bsp:
                bsp[key] = fix(bsp[key])
    for container in (doc.get("containers") or {}).values():
        if isinstance(container, dict) and "rootfs" in container:
            container["rootfs"] = fix(container["rootfs"])


def _arm64_busybox_trees(b: ImageBuild, doc: dict[str, Any], work: Path) -> None:
    """Busybox trees (rootfs/busybox-tree) built on the host carry the host's busybox:
    copy each one and put the board's busybox in its place. Other rootfs are left as
    they are (they must be built for the board already)."""
    busybox = b.packages_root / "usr/bin/busybox"
    for name, container in (doc.get("containers") or {}).items():
        rootfs = container.get("rootfs") if isinstance(container, dict) else None
        source = rootfs.get("dir") if isinstance(rootfs, dict) else rootfs
        if not isinstance(source, str) or not (Path(source) / "bin/busybox").is_file():
            continue
        tree = work / "rootfs" / name
        shutil.rmtree(tree, ignore_errors=True)
        shutil.copytree(source, tree, symlinks=True)
        shutil.copy2(busybox, tree / "bin/busybox")
        if isinstance(rootfs, dict):
            container["rootfs"] = {**rootfs, "dir": str(tree)}
        else:
            container["rootfs"] = str(tree)
        log.info("rootfs: arm64 busybox", container=name)


def build_board_revision(
    b: ImageBuild, spec: Path, out: Path, bsp_from: Path | None = None,
    revision: int | None = None,
) -> Path:  # fmt: skip
    """``spec`` built for the board into ``out`` and signed with ``b.key``.

    The board's BSP is added: its kernel, the initramfs and the kernel command
    line (the board's, then the spec's). With ``bsp_from`` (a revision dir, e.g.
    the factory ``b.revision_dir``) the BSP is taken from that revision instead,
    object for object: a later revision built so differs from it only in what
    the spec changes (an app-only update), whatever happened to the initramfs
    cache since. Busybox trees get the board's busybox. Used for the factory
    revision and for updates to an image. Raises PvpyError subclasses.
    """
    import tempfile

    import yaml

    from pvpy.signing import load_signing_key, sign_state
    from pvpy.state import canonical
    from pvpy.store import SIGNATURE_FILE, STATE_FILE, write_atomic
    from pvpy.workstation.spec import build, load_spec

    if b.key is None:
        raise UsageError("no signing key for the revision (--key)")
    key = load_signing_key(b.key)  # before the work: a wrong key path fails at once
    doc = load_spec(spec)
    _absolute_sources(doc, spec.resolve().parent)
    bsp = dict(doc.get("bsp") or {})
    if bsp_from is not None:
        base = canonical.decode((bsp_from / STATE_FILE).read_bytes())["bsp"]
        for part in ("kernel", "initrd", "dtb"):
            if isinstance(base.get(part), dict):
                bsp[part] = str(bsp_from / "objects" / base[part]["sha256"])
        bsp["cmdline"] = base.get("cmdline", "")
    else:
        board_cmdline = str(b.board.doc.get("cmdline") or "")
        cmdline = " ".join(filter(None, [board_cmdline, bsp.get("cmdline")]))
        bsp.update(kernel=str(b.kernel), initrd=str(b.initrd), cmdline=cmdline)
        if b.dtb is not None:  # a signed BSP object too: an update can change it
            bsp["dtb"] = str(b.dtb)
    doc["bsp"] = bsp
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        _arm64_busybox_trees(b, doc, Path(tmp))
        board_spec = Path(tmp) / "spec.yaml"
        board_spec.write_text(yaml.safe_dump(doc, sort_keys=False))
        shutil.rmtree(out, ignore_errors=True)
        build(board_spec, out, revision)
    data = (out / STATE_FILE).read_bytes()
    write_atomic(out / SIGNATURE_FILE, sign_state(data, [key]))
    return out


def build_update(
    image: Path, spec: Path, out: Path, key: Path | None = None, cache: Path | None = None,
    revision: int | None = None,
) -> Path:  # fmt: skip
    """A signed update for an image of ``build_image``: ``spec`` built for its board
    into ``out`` with the image's factory BSP (the same kernel and initramfs
    objects and command line: a spec that changes only apps makes an app-only
    update), signed with ``key`` (default: the image's ``keys/``, made by an
    image build without ``--key``; an image built with one needs it). The board's
    packages come from the cache (fetched when missing). Returns ``out``.
    Raises PvpyError subclasses.
    """
    image_dir = Path(image) if Path(image).is_dir() else Path(image).parent
    try:
        manifest = json.loads((image_dir / IMAGE_MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{image_dir}: not an image of `pvpy image build` ({e})") from e
    board = load_board(str(manifest.get("board_dir") or manifest["board"]))
    b = ImageBuild(board=board, out=image_dir, disk=image_dir / str(manifest["disk"]),
                   spec=Path(spec), key=Path(key) if key else image_dir / "keys",
                   cache=Path(cache or default_cache()), work=image_dir / ".work")  # fmt: skip
    for step in (ensure_host_tools, fetch_packages, extract_packages):
        step(b)
    return build_board_revision(b, b.spec, Path(out), bsp_from=image_dir / "revision",
                                revision=revision)  # fmt: skip


def build_revision(b: ImageBuild) -> None:
    """The spec with the board's BSP added, built and signed (the factory revision)."""
    from cryptography.hazmat.primitives import serialization

    from pvpy.signing import load_signing_key
    from pvpy.state import canonical

    if b.key is None:
        from pvpy.signing import generate_key

        keys = b.out / "keys"
        if not (keys / "pvpy.key").exists():
            generate_key(keys)
            log.warning("no --key: signed with a new development key", keys=str(keys))
        b.key = keys
    b.revision_dir = build_board_revision(b, b.spec, b.out / "revision")
    b.revision = int(canonical.decode((b.revision_dir / paths.STATE_FILE).read_bytes())["revision"])
    key = load_signing_key(b.key)
    b.trust = b.out / "trust.pub"
    b.trust.write_bytes(key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip


def provision_storage(b: ImageBuild) -> None:
    """pvpy's provisioning (verifies the revision, installs it with its boot.env),
    then what the board adds: the boot script, and a copy of the API token beside the image."""
    from pvpy.provision import provision

    b.storage = b.work / "storage"
    shutil.rmtree(b.storage, ignore_errors=True)
    provision(b.storage, b.revision_dir, [b.trust])
    if b.board.doc.get("bootloader", {}).get("script"):  # U-Boot boards; the Pi has none
        script = b.board.dir / b.board.get("bootloader", "script")
        _run.run(["mkimage", "-A", "arm64", "-T", "script", "-C", "none", "-n", "pvpy boot",
                  "-d", str(script), str(b.storage / "boot.scr")])  # fmt: skip
    # The token provisioning made, beside the image for `pvpy device push --token-file`.
    token = (b.storage / paths.API_TOKEN).read_bytes()
    fd = os.open(b.out / "api-token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(token)
