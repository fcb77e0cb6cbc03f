"""Named devices: one way to say which device a ``pvpy device`` verb talks to.

``pvpy device add NAME URL|--storage DIR [--token-file F]`` saves a device under a
name in ``$XDG_CONFIG_HOME/pvpy/devices.json`` (``~/.config/pvpy/devices.json``;
``$PVPY_DEVICES_FILE`` overrides it), a JSON object written atomically with mode
0600 in a 0700 directory: it names credentials files, never holds a token itself.
Every device verb then takes the device as ``NAME``, a URL or ``--storage DIR``
alike (``resolve``); ``$PVPY_DEVICE`` (a name or a URL) is the default when none
is given. Like ``docker context`` and ``balena login``, without a server.

Shared by both sides: ``pvpy.cli`` resolves the target, then hands a URL to the
workstation's verbs (the device API) and a storage to the device's (a sandbox's
control socket, or its files when it is not running). Standard library only.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pvpy.errors import UsageError

__all__ = [
    "Target",
    "add_device",
    "config_file",
    "is_device_word",
    "is_url",
    "load_devices",
    "remove_device",
    "resolve",
]

DEVICES_FILE = "devices.json"
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,62}")
URL_SCHEMES = ("http://", "https://", "unix:")


@dataclass(frozen=True)
class Target:
    """A device to talk to: over its API (``url``) or a sandbox's storage."""

    url: str | None = None
    storage: Path | None = None
    token_file: Path | None = None
    name: str | None = None  # the saved name it came from, if any

    def describe(self) -> str:
        where = self.url if self.url is not None else f"--storage {self.storage}"
        return f"{self.name} ({where})" if self.name else where

    def to_dict(self) -> dict[str, str]:
        doc = {"url": self.url, "storage": self.storage, "token_file": self.token_file}
        return {k: str(v) for k, v in doc.items() if v is not None}


def is_url(word: str) -> bool:
    """A device URL rather than a name: http(s)://HOST:PORT or unix:/path."""
    return word.startswith(URL_SCHEMES)


def config_file() -> Path:
    """Where saved devices live (see the module docstring)."""
    explicit = os.environ.get("PVPY_DEVICES_FILE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "pvpy" / DEVICES_FILE


def load_devices() -> dict[str, Target]:
    """The saved devices by name; none when the file does not exist.

    Raises UsageError naming the file when it cannot be read or is not ours.
    """
    path = config_file()
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not JSON"
        raise UsageError(f"{path}: cannot read the saved devices ({reason})") from e
    devices = doc.get("devices") if isinstance(doc, dict) else None
    if not isinstance(devices, dict):
        raise UsageError(f'{path}: not a pvpy devices file ({{"devices": {{NAME: ...}}}})')
    out: dict[str, Target] = {}
    for name, entry in devices.items():
        if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
            raise UsageError(f"{path}: device {name!r} is not an object of strings")
        storage, token_file = entry.get("storage"), entry.get("token_file")
        out[str(name)] = Target(
            url=entry.get("url"),
            storage=Path(storage) if storage else None,
            token_file=Path(token_file) if token_file else None,
            name=str(name),
        )
    return out


def _save(devices: dict[str, Target]) -> None:
    from pvpy.store import write_atomic

    path = config_file()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    doc = {"devices": {name: t.to_dict() for name, t in sorted(devices.items())}}
    write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode(), mode=0o600)


def add_device(name: str, url: str | None, storage: str | None, token_file: str | None) -> Target:
    """Save (or replace) a device under ``name``. Raises UsageError for bad input:
    a name that is not one, both or neither of URL and storage, a missing file."""
    if not NAME.fullmatch(name):
        raise UsageError(f"{name!r}: a device name is a letter, then letters, digits, _ . -")
    if (url is None) == (storage is None):
        raise UsageError("give the device as a URL or as --storage DIR (one of them)")
    if url is not None and not is_url(url):
        raise UsageError(f"{url}: the device URL must be http(s)://HOST:PORT or unix:/path")
    if storage is not None and token_file is not None:
        raise UsageError("--token-file is for a device at a URL (a sandbox needs none)")
    token_path = None
    if token_file is not None:
        from pvpy.api_credentials import read_credentials

        token_path = Path(token_file).resolve()
        read_credentials(token_path)  # a wrong file is named now, not at every use
    target = Target(
        url=url,
        storage=Path(storage).resolve() if storage is not None else None,
        token_file=token_path,
        name=name,
    )
    devices = load_devices()
    devices[name] = target
    _save(devices)
    return target


def remove_device(name: str) -> None:
    """Forget a saved device. Raises UsageError when there is none by that name."""
    devices = load_devices()
    if name not in devices:
        raise UsageError(f"no saved device {name!r} (`pvpy device list` shows them)")
    del devices[name]
    _save(devices)


def resolve(word: str | None, storage: str | None) -> Target:
    """The device a verb was given: ``word`` (a saved name or a URL), ``--storage``,
    else ``$PVPY_DEVICE``. Raises UsageError when there is none, two, or an unknown name."""
    if word is not None and storage is not None:
        raise UsageError(f"give the device as NAME, URL or --storage DIR (one of them, "
                         f"not {word!r} and --storage)")  # fmt: skip
    if storage is not None:
        return Target(storage=Path(storage))
    if word is None:
        word = os.environ.get("PVPY_DEVICE") or None
        if word is None:
            raise UsageError("which device? give NAME, URL or --storage DIR "
                             "(or set PVPY_DEVICE; `pvpy device add` saves one)")  # fmt: skip
    if is_url(word):
        return Target(url=word)
    devices = load_devices()
    if word not in devices:
        known = ", ".join(sorted(devices)) or "none saved"
        raise UsageError(f"no saved device {word!r} ({known}; `pvpy device add NAME URL` "
                         "saves one)")  # fmt: skip
    return devices[word]


def is_device_word(word: str) -> bool:
    """``word`` names a device (a URL or a saved name) rather than, say, a container."""
    if is_url(word):
        return True
    try:
        return word in load_devices()
    except UsageError:
        return False
