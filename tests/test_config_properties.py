"""Meta-training config files with one value changed to anything (Hypothesis): loading gives a config that
validates, or a ValueError / TypeError that names the key; never another exception, never a silent default.

``pytest --hypothesis-show-statistics`` prints how the cases ended.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hf_hyperflow.registry import data_builders
from hf_hyperflow.training import load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = yaml.safe_load((ROOT / "recipes" / "configs" / "smoke.yaml").read_text())
BUILDERS = data_builders()  # what train() checks a dataset's builder name against


def _leaves(data, path=()):
    """``(path, value)`` of every leaf of the YAML tree (list items by index)."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(data, list) and any(isinstance(v, dict) for v in data):
        for i, value in enumerate(data):
            yield from _leaves(value, (*path, i))
    else:
        yield path, data


LEAVES = [path for path, _ in _leaves(SMOKE) if path[0] not in ("output_dir",) and path[-1] not in ("source",)]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=8), st.lists(st.integers(-2, 40), max_size=3), st.just({}), st.just({"x": 1}),
                   st.just("[1, 2]"), st.just("lora"), st.just(0), st.just(-1), st.just(1e-12))


def _set(data, path, value):
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


@pytest.fixture(scope="module")
def base(synthetic_dataset, tmp_path_factory) -> dict:
    data = yaml.safe_load(yaml.safe_dump(SMOKE))
    data["output_dir"] = str(tmp_path_factory.mktemp("run"))
    data["datasets"][0].update(source=synthetic_dataset, builder=None, max_classes=None)
    load_config(_write(tmp_path_factory.mktemp("ok"), data), data_builders=BUILDERS)  # the unchanged config loads
    return data


def _write(folder: Path, data: dict) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(path=st.sampled_from(LEAVES), value=VALUES)
def test_one_value_changed_loads_or_names_its_key(base, tmp_path, path, value):
    data = yaml.safe_load(yaml.safe_dump(base))
    _set(data, path, value)
    key = ".".join(map(str, path))
    try:
        config = load_config(_write(tmp_path, data), data_builders=BUILDERS)
    except (ValueError, TypeError) as error:
        names = {str(path[-1]), key, key.replace(".0.", "[0].")}
        assert any(name in str(error) for name in names), f"{key}={value!r}: the error names no key: {error}"
        event("clear error naming the key")
        return
    section = config
    for part in path[:-1]:
        section = section[part] if isinstance(part, int) else getattr(section, part)
    got = section[path[-1]] if isinstance(section, dict) else getattr(section, path[-1])
    assert _same(got, value), f"{key}={value!r} loaded as {got!r}"
    event("loaded and valid")


def _same(got, value) -> bool:
    """``got`` is ``value`` as the config holds it (an int given for a float, a list for a tuple)."""
    if isinstance(value, float) and math.isnan(value):
        return False  # a NaN setting is never valid: it must be refused
    if isinstance(value, bool) or isinstance(got, bool):
        return got is value
    if isinstance(value, int | float) and isinstance(got, int | float):
        return float(got) == float(value)
    if isinstance(got, tuple | list) and isinstance(value, list):
        return list(got) == value
    return got == value
