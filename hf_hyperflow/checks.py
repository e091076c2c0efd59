"""Checks of user-given numbers and strings, with messages that name the value and say what is allowed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["is_number", "check_int", "check_number", "check_str", "check_str_list"]


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(value: Any, name: str, low: int) -> None:
    """``value`` must be an int (not a bool) >= ``low``; ValueError ``"<name> must be an integer >= <low>"``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")


def check_number(value: Any, name: str, low: float = -math.inf, high: float = math.inf, *,
                 strict_low: bool = False) -> None:
    """``value`` must be a finite number in ``[low, high]`` (``(low, high]`` with ``strict_low``)."""
    ok = is_number(value) and (value > low if strict_low else value >= low) and value <= high
    if ok:
        return
    if high < math.inf:
        bounds = f"in {'(' if strict_low else '['}{low}, {high}]"
    elif low > -math.inf:
        bounds = f"> {low}" if strict_low else f">= {low}"
    else:
        bounds = "(finite)"
    raise ValueError(f"{name} must be a number {bounds}, got {value!r}.")


def check_str(value: Any, name: str, *, optional: bool = False) -> None:
    """``value`` must be a non-empty string (or None with ``optional``); TypeError otherwise."""
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty string, got {value!r}.")


def check_str_list(value: Any, name: str) -> None:
    """``value`` must be a list (any non-string sequence) of non-empty strings; TypeError otherwise."""
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise TypeError(f"{name} must be a list of non-empty strings, got {value!r}.")
