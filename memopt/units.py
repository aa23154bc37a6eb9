"""Byte sizes as users write them: ``"12GiB"``, ``"512MB"``, ``1 << 30``."""

from __future__ import annotations

import re

__all__ = ["format_bytes", "parse_bytes"]

_SUFFIX = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | str, *, what: str = "size") -> int:
    """Parse a byte count.

    Args:
        value (int | str): bytes as an int, or a string such as ``"12GiB"``, ``"1.5 GB"``, ``"4096"``.
        what (str, default "size"): the name used in error messages.

    Returns:
        int: the number of bytes.

    Raises:
        ValueError: the value is not a positive byte count.

    Example:
        >>> parse_bytes("1.5KiB")
        1536
    """
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a byte count, got {value!r}; pass e.g. '12GiB' or 12884901888")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _PATTERN.match(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _SUFFIX:
            raise ValueError(f"{what} {value!r} is not a byte count; write e.g. '12GiB', '512MB' or '4096'")
        n = int(float(m.group(1)) * _SUFFIX[unit])
    else:
        raise ValueError(f"{what} must be an int or a string like '12GiB', got {type(value).__name__} {value!r}")
    if n <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}; pass e.g. '12GiB'")
    return n


def format_bytes(n: float) -> str:
    """Render bytes with a binary suffix, e.g. ``format_bytes(1536) == '1.50 KiB'``."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
