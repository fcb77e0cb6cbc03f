"""What the steps of an image build share: ``ImageBuild``, and the ``image.json`` it ends with.

Each step (``verb_noun(b: ImageBuild)``) reads the fields earlier steps set
and sets its own; the order is the step lists' in ``pvpy.workstation.image``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvpy.workstation.image.board import Board

__all__ = ["IMAGE_MANIFEST", "ImageBuild", "default_cache", "write_image_manifest"]

IMAGE_MANIFEST = "image.json"  # what `pvpy qemu run` and build_update read


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pvpy"


@dataclass
class ImageBuild:
    board: Board
    out: Path
    disk: Path
    spec: Path
    key: Path | None
    cache: Path
    work: Path
    timings: dict[str, float] = field(default_factory=dict)
    kernel_package: str = ""
    kernel_version: str = ""
    packages_root: Path = Path()
    kernel_root: Path = Path()
    initrd: Path = Path()
    kernel: Path = Path()
    revision: int = 0
    revision_dir: Path = Path()
    storage: Path = Path()
    trust: Path = Path()
    dtb: Path | None = None  # the board's device tree, from the kernel package (rpi)
    firmware_root: Path = Path()  # the extracted boot firmware package (rpi)

    @property
    def apt(self) -> Path:
        return self.cache / "apt-arm64"


def write_image_manifest(b: ImageBuild, **board_specific: Any) -> None:
    """``image.json``: what every image has, plus what its kind of boot needs."""
    manifest = {
        "board": b.board.name,
        "board_dir": str(b.board.dir),
        "disk": b.disk.name,
        **board_specific,
        "kernel_package": b.kernel_package,
        "revision": b.revision,
        "api_token": "api-token",
        "qemu": b.board.doc.get("qemu", {}),
    }
    (b.out / IMAGE_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
