"""Build a revision from a YAML spec (workstation side).

A spec is a state manifest written for people: the same keys as state.json,
but objects are given as sources (paths relative to the spec file) and
durations and sizes may carry units. ``build`` packs the objects into
``OUT/objects/``, writes ``OUT/state.json`` in canonical form, and drops any
stale signature. See ``examples/demo/spec.yaml``.

::

    revision: 1
    bsp:
      kernel: boot/Image                 # any file -> object
      modules: boot/modules/             # dir/tarball -> squashfs image
    containers:
      os:
        role: host-os
        rootfs: rootfs/os                # dir, tarball, OCI layout, squashfs
        args: [/sbin/init]
      web:
        rootfs: {oci: images/web, tag: "1.2", compression: xz}   # default zstd
        restart: {policy: always, backoff_initial_ms: 500ms}
        cgroup: {memory_max: 64M}
      db:
        rootfs: {docker-archive: images/db.tar, tag: "16"}        # docker save's tarball
        user: postgres                   # a name: the image's own /etc/passwd
        image_volumes: revision          # or permanent (default), boot, none

An image's config fills what the spec leaves out (``_apply_image_config``):
args, env (the spec's keys win), cwd, user, stop_signal, volumes (each of the
image's Volumes becomes a volume unless the spec has one at that target) and
readiness (from a Docker Healthcheck, with status_goal READY).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pvpy.errors import ManifestError, SpecError, UsageError
from pvpy.state import SPEC, State, canonical, json_path, validate
from pvpy.store import SIGNATURE_FILE, STATE_FILE, ObjectStore, write_atomic
from pvpy.workstation.imageconfig import resolve_user
from pvpy.workstation.pack import DEFAULT_COMPRESSION, PackedImage, pack_rootfs

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h)?\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, None: 1}
_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
SIZE_KEYS = ("memory_max",)
BSP_FILES = ("kernel", "initrd", "dtb")
BSP_IMAGES = ("modules", "firmware")


@dataclass(frozen=True)
class BuildResult:
    state: State
    out: Path
    objects_added: int


def load_spec(path: Path) -> dict[str, Any]:
    """Read a YAML spec. Raises SpecError with the line of a YAML error."""
    import yaml

    try:
        text = Path(path).read_text("utf-8")
    except OSError as e:
        raise SpecError(f"{path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8") from e
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{path}:{where}: invalid YAML: {problem}") from e
    except ValueError as e:  # a value YAML cannot construct, e.g. the date 2030-13-45
        raise SpecError(f"{path}: invalid YAML value: {e}") from e
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: a spec is a YAML mapping")
    return doc


# A spec nests a few levels deep and holds hundreds of values. YAML aliases can make a
# value that holds itself (endless) or repeat a subtree (exponential): refuse both
# rather than exhaust the stack or hang the build.
MAX_SPEC_DEPTH = 32
MAX_SPEC_VALUES = 100_000


def _convert_units(doc: dict[str, Any]) -> dict[str, Any]:
    """Turn "30s" into 30000 for *_ms keys and "64M" into bytes for sizes; return a
    new tree (no value shared through aliases)."""
    left = MAX_SPEC_VALUES

    def convert(value: Any, key: Any, path: list[Any]) -> Any:
        nonlocal left
        left -= 1
        if left < 0:
            raise SpecError(f"more than {MAX_SPEC_VALUES} values (YAML aliases repeating one?)")
        if len(path) > MAX_SPEC_DEPTH:
            where = json_path(path[:MAX_SPEC_DEPTH])
            raise SpecError(f"nested deeper than {MAX_SPEC_DEPTH} (a YAML alias in itself?)", where)
        if isinstance(value, dict):
            return {k: convert(v, k, [*path, k]) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v, key, [*path, i]) for i, v in enumerate(value)]
        if isinstance(value, str) and isinstance(key, str) and key.endswith("_ms"):
            m = _DURATION.match(value)
            if not m:
                raise SpecError(f"not a duration (e.g. 500ms, 30s, 2m): {value!r}", json_path(path))
            return int(m.group(1)) * _DURATION_UNITS[m.group(2)]
        if isinstance(value, str) and key in SIZE_KEYS:
            m = _SIZE.match(value)
            if not m:
                raise SpecError(f"not a size (e.g. 64M, 1G): {value!r}", json_path(path))
            unit = (m.group(2) or "").upper().rstrip("B").rstrip("I") or ""
            return int(m.group(1)) * _SIZE_UNITS[unit or ""]
        if isinstance(value, dt.datetime):
            if value.tzinfo is not None:
                value = value.astimezone(dt.UTC).replace(tzinfo=None)
            return value.strftime("%Y-%m-%dT%H:%M:%SZ")
        if isinstance(value, float):
            raise SpecError("use an integer (no fractions)", json_path(path))
        return value

    converted: dict[str, Any] = convert(doc, "", [])
    return converted


_SOURCE_KINDS = ("dir", "tar", "oci", "docker-archive", "file", "squashfs")
_SOURCE_OPTIONS = {"tag": str, "compression": str, "all_root": bool}
DOCKER_ARCHIVE = "docker-archive"
# Spec-only container key: what becomes of an image's Volumes (a persistence, or none).
IMAGE_VOLUMES = "image_volumes"
IMAGE_VOLUME_CHOICES = ("permanent", "revision", "boot", "none")
DEFAULT_IMAGE_VOLUMES = "permanent"  # as Docker's volumes: they outlive the container


def _source(spec_dir: Path, value: Any, where: str) -> tuple[Path, dict[str, Any]]:
    """A source given as a path string or {dir|tar|oci|docker-archive|file: path,
    ...options}; a docker-archive says so in its options (``docker-archive: True``)."""
    if isinstance(value, str):
        return spec_dir / value, {}
    if isinstance(value, dict):
        kinds = [k for k in _SOURCE_KINDS if k in value]
        if len(kinds) == 1 and isinstance(value[kinds[0]], str):
            options = {k: v for k, v in value.items() if k != kinds[0]}
            unknown = set(options) - set(_SOURCE_OPTIONS)
            if unknown:
                raise SpecError(f"unknown source option(s) {sorted(map(str, unknown))}", where)
            for option, kind in _SOURCE_OPTIONS.items():
                if option in options and not isinstance(options[option], kind):
                    raise SpecError(f"{option} must be a {kind.__name__}", f"{where}.{option}")
            if kinds[0] == DOCKER_ARCHIVE:
                options[DOCKER_ARCHIVE] = True
            return spec_dir / value[kinds[0]], options
    raise SpecError("a source is a path or {dir|tar|oci|docker-archive|file: PATH, ...}", where)


def _created_now() -> str:
    """SOURCE_DATE_EPOCH (reproducible builds) or now, as a state's ``created``."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    try:
        when = dt.datetime.fromtimestamp(int(epoch), dt.UTC) if epoch else dt.datetime.now(dt.UTC)
    except (ValueError, OverflowError, OSError) as e:
        raise UsageError(f"SOURCE_DATE_EPOCH is not a time in seconds: {epoch!r}") from e
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def build(spec_path: Path, out: Path, revision: int | None = None) -> BuildResult:
    """Build the revision a spec describes into ``out``. Raises SpecError/ManifestError.

    A build that fails leaves ``out`` as it found it: the objects it added and the
    directories it made are removed (an earlier build's state and objects stay).
    """
    spec_path, out = Path(spec_path), Path(out)
    spec_dir = spec_path.parent
    doc = _convert_units(load_spec(spec_path))
    if not isinstance(doc.get("containers", {}), dict):
        raise SpecError("containers must be a mapping of name to container", "$.containers")
    doc["#spec"] = SPEC
    if revision is not None:
        doc["revision"] = revision
    if "created" not in doc:
        doc["created"] = _created_now()
    _prevalidate(doc)  # before anything is written: a typo fails before minutes of packing

    store = ObjectStore(out / "objects")
    made = [d for d in (out, store.root, store.tmp) if not d.exists()]
    store.ensure()
    before = set(store.names())
    try:
        state = _pack_objects(doc, spec_dir, store)
    except BaseException:
        store.gc(before)
        for directory in reversed(made):
            with contextlib.suppress(OSError):  # only if empty: never what others put there
                directory.rmdir()
        raise
    data = canonical.encode(state.to_dict())
    # A new state invalidates any old signature: remove it before writing.
    (out / SIGNATURE_FILE).unlink(missing_ok=True)
    write_atomic(out / STATE_FILE, data)
    # Objects of earlier builds into the same dir are not part of this one.
    store.gc(state.objects())
    added = len(set(state.objects()) - before)
    return BuildResult(state=state, out=out, objects_added=added)


def _pack_objects(doc: dict[str, Any], spec_dir: Path, store: ObjectStore) -> State:
    """Put the spec's objects into ``store``, replace their sources by references in
    ``doc``, and return the state it describes."""
    bsp = doc.get("bsp")
    if isinstance(bsp, dict):
        for key in BSP_FILES:
            if key in bsp:
                path, _ = _source(spec_dir, bsp[key], f"$.bsp.{key}")
                if not path.is_file():
                    raise SpecError(f"{path}: no such file", f"$.bsp.{key}")
                sha = store.put_file(path)
                bsp[key] = {"sha256": sha, "size": store.size(sha)}
        for key in BSP_IMAGES:
            if key in bsp:
                bsp[key] = _pack(spec_dir, bsp[key], store, f"$.bsp.{key}")[0]

    for name, c in (doc.get("containers") or {}).items():
        where = json_path(["containers", name])
        if not isinstance(c, dict) or "rootfs" not in c:
            continue  # validate() below names what is missing
        image_volumes = _image_volumes_choice(c, where)
        source = c["rootfs"]
        c["rootfs"], packed = _pack(spec_dir, source, store, f"{where}.rootfs")
        image_name = str(_source(spec_dir, source, where)[0])
        _apply_image_config(c, packed, image_name, image_volumes, where)

    validate(doc)
    return State.from_dict(doc)


def _image_volumes_choice(c: dict[str, Any], where: str) -> str:
    """Take the spec-only ``image_volumes`` key out of container ``c``."""
    choice = c.pop(IMAGE_VOLUMES, DEFAULT_IMAGE_VOLUMES)
    if choice not in IMAGE_VOLUME_CHOICES:
        choices = ", ".join(IMAGE_VOLUME_CHOICES)
        raise SpecError(f"{choice!r} is not one of {choices}", f"{where}.{IMAGE_VOLUMES}")
    return str(choice)


def _apply_image_config(
    c: dict[str, Any], packed: PackedImage, image: str, image_volumes: str, where: str
) -> None:
    """Fill what container ``c`` leaves out from its image's own run config, and
    resolve a user name through the image's /etc/passwd and /etc/group."""
    config = packed.config
    if "args" not in c and config.args:
        c["args"] = config.args
    if config.env:
        c["env"] = {**config.env, **(c.get("env") or {})}
    if "cwd" not in c and config.cwd:
        c["cwd"] = config.cwd
    user = c.get("user", config.user)
    if isinstance(user, int) and not isinstance(user, bool):
        user = str(user)  # YAML's `user: 1000`
    if isinstance(user, str):
        try:
            uid, gid = resolve_user(user, packed.accounts, image)
        except SpecError as e:
            raise SpecError(e.reason, f"{where}.user") from e
        c["user"] = {"uid": uid, "gid": gid}
    if "stop_signal" not in c and config.stop_signal:
        c["stop_signal"] = config.stop_signal  # the image's StopSignal (systemd: RTMIN+3)
    if image_volumes != "none" and config.volumes:
        _add_image_volumes(c, config.volumes, image_volumes)
    if "readiness" not in c and config.readiness is not None:
        c["readiness"] = config.readiness  # the image's Healthcheck
        c.setdefault("status_goal", "READY")  # "healthy" is what the image asks to wait for


def _add_image_volumes(c: dict[str, Any], targets: tuple[str, ...], persistence: str) -> None:
    """Add a volume for each image volume target the spec has none at."""
    volumes = c.get("volumes", [])
    if not isinstance(volumes, list) or not all(isinstance(v, dict) for v in volumes):
        return  # validate() names what is wrong
    own_targets = {os.path.normpath(str(v.get("target", ""))) for v in volumes}
    taken = {str(v.get("name")) for v in volumes}
    added = []
    for target in targets:
        if target in own_targets:
            continue  # the spec's own volume there wins
        name = image_volume_name(target, taken)
        taken.add(name)
        added.append({"name": name, "target": target, "persistence": persistence})
    if added:
        # Parents before children, whoever named them: a later mount hides what is under it.
        c["volumes"] = sorted([*volumes, *added], key=_target_depth)


def _target_depth(volume: dict[str, Any]) -> int:
    return os.path.normpath(str(volume.get("target", ""))).count("/")


_NOT_IN_A_NAME = re.compile(r"[^a-z0-9_.-]+")


def image_volume_name(target: str, taken: set[str]) -> str:
    """The volume name of an image's volume at ``target``: the path, lower case,
    "-" for every run of other characters ("/var/lib/db" -> "var-lib-db"); with a
    hash of the target when that is too long or already taken. The same target
    gives the same name in every revision, so a permanent volume stays the same."""
    name = _NOT_IN_A_NAME.sub("-", target.lower()).strip("-._")
    if not name or len(name) > 63 or name in taken:
        digest = hashlib.sha256(target.encode()).hexdigest()[:8]
        name = f"{name[:54].rstrip('-._') or 'volume'}-{digest}"
    return name


_PLACEHOLDER = {"sha256": "0" * 64, "size": 0}


def _prevalidate(doc: dict[str, Any]) -> None:
    """Validate with placeholder objects, so a typo fails before minutes of packing."""
    import copy

    probe = copy.deepcopy(doc)
    bsp = probe.get("bsp")
    if isinstance(bsp, dict):
        for key in BSP_FILES:
            if key in bsp:
                bsp[key] = dict(_PLACEHOLDER)
        for key in BSP_IMAGES:
            if key in bsp:
                bsp[key] = {**_PLACEHOLDER, "format": "squashfs"}
    for name, c in (probe.get("containers") or {}).items():
        if isinstance(c, dict):
            _image_volumes_choice(c, json_path(["containers", name]))
        if isinstance(c, dict) and "rootfs" in c:
            c["rootfs"] = {**_PLACEHOLDER, "format": "squashfs"}
            c.setdefault("args", ["/placeholder"])  # an OCI image may supply them
            if isinstance(c.get("user"), (str, int)) and not isinstance(c["user"], bool):
                c["user"] = {"uid": 0, "gid": 0}  # a name: resolved in the image later
    validate(probe)


def _pack(
    spec_dir: Path, value: Any, store: ObjectStore, where: str
) -> tuple[dict[str, Any], PackedImage]:
    path, options = _source(spec_dir, value, where)
    try:
        packed = pack_rootfs(
            path,
            store,
            tag=options.get("tag"),
            compression=options.get("compression", DEFAULT_COMPRESSION),
            all_root=bool(options.get("all_root", False)),
            docker_archive=bool(options.get(DOCKER_ARCHIVE, False)),
        )
    except ManifestError as e:
        if e.path == "$":
            raise SpecError(e.reason, where) from e
        raise
    ref = {"sha256": packed.sha256, "size": packed.size, "format": "squashfs"}
    return ref, packed
