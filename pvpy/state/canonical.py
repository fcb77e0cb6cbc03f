"""Canonical JSON: the one byte encoding of a document that gets signed.

Rules (a subset of RFC 8785 that needs no float formatting): object keys
sorted by code point, no insignificant whitespace, UTF-8, strings escaped
as by ``json.dumps(ensure_ascii=False)``, integers only (floats are refused
because their text form is not unique), booleans and null as usual.
"""

from __future__ import annotations

import json

from pvpy.errors import ManifestError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from typing import Any


def _check(value: Any, path: str) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        return
    if isinstance(value, float):
        raise ManifestError("floats are not allowed in canonical JSON; use integers", path)
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ManifestError("object keys must be strings", path)
            _check(item, f"{path}.{key}")
        return
    raise ManifestError(f"{type(value).__name__} is not a JSON value", path)


def encode(doc: Any) -> bytes:
    """Return the canonical bytes of ``doc``. Raises ManifestError."""
    _check(doc, "$")
    try:
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return text.encode("utf-8")
    except (UnicodeEncodeError, ValueError) as e:  # lone surrogates, deep nesting
        raise ManifestError(f"cannot encode: {e}") from e


def decode(data: bytes) -> Any:
    """Parse JSON bytes strictly: UTF-8, no duplicate keys, no NaN/Infinity.

    Raises ManifestError with a one-line reason.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"not UTF-8 (byte {e.start})") from e

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ManifestError(f"duplicate key {key!r}")
            out[key] = value
        return out

    def no_constant(name: str) -> Any:
        raise ManifestError(f"{name} is not valid JSON")

    try:
        return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise ManifestError(f"not JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    except RecursionError as e:
        raise ManifestError("not JSON: nested too deeply") from e


def is_canonical(data: bytes) -> bool:
    try:
        return encode(decode(data)) == data
    except ManifestError:
        return False
