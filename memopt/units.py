"""Byte sizes as users write them: ``"12GiB"``, ``"512MB"``, ``1 << 30``."""

from __future__ import annotations

import re

__all__ = ["format_budget", "format_bytes", "parse_budget", "parse_bytes"]

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


def parse_budget(value: int | float | str, *, what: str = "budget") -> int | float:
    """A budget as users write it: bytes (an int, a whole float such as JSON's ``12e9``, or ``"12GiB"``), or a
    fraction of the activation peak (a float in (0, 1], or a string such as ``"0.5"`` or ``"50%"`` from a
    command line or a JSON config).

    Args:
        value (int | float | str): the budget.
        what (str, default "budget"): the name used in error messages.

    Returns:
        int | float: bytes as an int, or a fraction as a float.

    Raises:
        ValueError: neither a positive byte count nor a fraction in (0, 1].

    Example:
        >>> parse_budget("0.5"), parse_budget("25%"), parse_budget(12e9), parse_budget("1GiB")
        (0.5, 0.25, 12000000000, 1073741824)
    """
    if isinstance(value, str) and value.strip().endswith("%"):
        number = value.strip()[:-1].strip()
        m = _PATTERN.match(number)
        percent = float(number) if m is not None and not m.group(2) else None
        if percent is None or not 0 < percent <= 100:
            raise ValueError(f"{what} {value!r} is not a percentage in (0, 100] of the activation peak; pass e.g. "
                             "'50%' (or 0.5), or bytes such as '12GiB'")
        return percent / 100
    if isinstance(value, str):
        m = _PATTERN.match(value)
        if m is not None and not m.group(2) and any(c in m.group(1) for c in ".eE"):
            value = float(m.group(1))
    if isinstance(value, float):
        if not value > 0 or value != value or value == float("inf"):
            raise ValueError(f"{what} must be positive, got {value!r}; pass a fraction of the activation peak such "
                             "as 0.5, or bytes such as '12GiB'")
        if value <= 1.0:
            return value
        if value.is_integer():
            return int(value)
        raise ValueError(f"{what} {value!r} is neither a fraction in (0, 1] nor a whole number of bytes; pass e.g. "
                         "0.5 (of the activation peak) or '12GiB'")
    return parse_bytes(value, what=what)


def format_bytes(n: float) -> str:
    """Render bytes with a binary suffix, e.g. ``format_bytes(1536) == '1.50 KiB'``."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_BUDGET_UNITS = (("B", 1), ("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("TiB", 1 << 40))


def format_budget(n_bytes: int) -> str:
    """``n_bytes`` as a budget string that parses back to at least ``n_bytes``, e.g. ``'58.53GiB'``.

    Rounds up to two decimals in the unit ``format_bytes`` would pick and has no space, so the text works as
    written as a Python budget, in a DeepSpeed config and on the command line.

    Example:
        >>> format_budget(1536), format_budget(1537), format_budget(1000)
        ('1.50KiB', '1.51KiB', '1000B')
    """
    name, size = next(((n, s) for n, s in reversed(_BUDGET_UNITS) if n_bytes >= s), _BUDGET_UNITS[0])
    if size == 1:
        return f"{n_bytes}B"
    hundredths = -(-n_bytes * 100 // size)
    # parse_bytes reads the decimal through a float: step up where that lands a byte below n_bytes.
    while parse_bytes(text := f"{hundredths // 100}.{hundredths % 100:02d}{name}") < n_bytes:
        hundredths += 1
    return text
