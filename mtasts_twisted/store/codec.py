"""
What a shelf stores: str keys and JSON-serialisable dicts, kept as JSON text
(never pickle).  The checks here are shared by every shelf, in a database or
in memory, so that all of them accept and refuse the same keys and values.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

__all__ = ["JSONDict", "UpdateFunction"]

#: A stored value: a dict that survives a JSON round trip unchanged.
JSONDict = dict[str, Any]

#: The function of L{IShelf.update<mtasts_twisted.interfaces.IShelf.update>}:
#: the old value (or L{None}) to the new value (or L{None} to delete).
UpdateFunction = Callable[[Optional[JSONDict]], Optional[JSONDict]]


def _encode(value: Any) -> str:
    """
    Return the JSON text of C{value}.

    @raise TypeError: C{value} is not a dict, or JSON would change it.
    @raise ValueError: C{value} holds NaN or an infinity.
    """
    if not isinstance(value, dict):
        raise TypeError(f"a stored value must be a dict, not {type(value).__name__}")
    text = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    # Refuse what JSON would silently change (tuples, non-str keys): what
    # get() returns must equal what put() was given.
    if json.loads(text) != value:
        raise TypeError(
            "the value does not survive a JSON round trip (use str keys and"
            f" lists, not tuples): {text[:200]}"
        )
    return text


def _decode(text: Optional[str]) -> Optional[JSONDict]:
    """Return the value of JSON C{text} (a fresh dict), or L{None} for L{None}."""
    return None if text is None else json.loads(text)


def _check_key(key: Any) -> None:
    """
    Refuse a key no backend can store the same way.

    @raise TypeError: C{key} is not a str.
    @raise ValueError: C{key} holds NUL or is not encodable as UTF-8.
    """
    if not isinstance(key, str):
        raise TypeError(f"a key must be a str, not {type(key).__name__}")
    if "\x00" in key:
        raise ValueError(f"a key must not contain NUL: {key!r}")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"a key must be encodable as UTF-8: {key!r}") from e
