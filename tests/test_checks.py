"""Number and string checks: what passes, and messages that name the value and what is allowed."""

from __future__ import annotations

import math

import pytest

from hf_hyperflow.checks import check_int, check_number, check_str, check_str_list, is_number


def test_numbers():
    assert is_number(1) and is_number(0.5) and not is_number(True) and not is_number(math.nan)
    assert not is_number("1")


@pytest.mark.parametrize("value", [0, -1, 1.0, True, "2", None])
def test_check_int_refuses(value):
    with pytest.raises(ValueError, match=rf"steps must be an integer >= 1, got {value!r}\."):
        check_int(value, "steps", 1)


def test_check_number_states_its_bounds():
    check_number(0.0, "lr", 0.0)
    check_number(1, "p", 0.0, 1.0)
    with pytest.raises(ValueError, match=r"lr must be a number > 0.0, got 0.0\."):
        check_number(0.0, "lr", 0.0, strict_low=True)
    with pytest.raises(ValueError, match=r"p must be a number in \[0.0, 1.0\], got 1.5\."):
        check_number(1.5, "p", 0.0, 1.0)
    with pytest.raises(ValueError, match=r"x must be a number \(finite\), got inf\."):
        check_number(math.inf, "x")


def test_strings():
    check_str("a", "name")
    check_str(None, "name", optional=True)
    check_str_list(["a", "b"], "tags")
    with pytest.raises(TypeError, match="name must be a non-empty string, got ''"):
        check_str("", "name")
    with pytest.raises(TypeError, match="tags must be a list of non-empty strings, got 'ab'"):
        check_str_list("ab", "tags")
