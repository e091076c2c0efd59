"""Dataclass configs through draccus: values from a file and the command line, and errors that name the key (an
unknown key with the keys of its section, a bad value with its dotted key, a config's own check as it is)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from hf_hyperflow.parsing import decode, option, parse


@dataclass
class Inner:
    steps: int = option("Steps.", 3)
    ratio: float | None = option("A ratio.")


@dataclass
class Item:
    name: str = option("A name.", "")


@dataclass
class Settings:
    output: str = option("Where.", "out")
    inner: Inner = option("A section.", Inner)
    items: list[Item] = option("A list section.", list)
    maybe: Inner | None = option("An optional section.")

    def __post_init__(self):
        if self.inner.steps < 1:
            raise ValueError(f"inner.steps must be an integer >= 1, got {self.inner.steps}.")


def test_a_file_and_overrides(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text("output: x\ninner: {steps: 5}\nitems: [{name: a}]\n")
    settings = parse(Settings, ["--config_path", str(path), "--inner.ratio", "0.5", "--items", "[{name: b}, {name: c}]"])
    assert settings == Settings(output="x", inner=Inner(steps=5, ratio=0.5), items=[Item("b"), Item("c")])
    assert option("h", list).default_factory is list and option("h", 2).metadata == {"help": "h"}


@pytest.mark.parametrize("args,message", [
    (["--inner.stpes", "2"], r"Unknown key 'inner.stpes'; the keys of inner are \['steps', 'ratio'\]\."),
    (["--outptu", "x"], r"Unknown key 'outptu'; the keys of the top level are \['output', 'inner', 'items', 'maybe'\]"),
    (["--items.0.name", "x"], r"items is a list, overridden whole on the command line: --items '\[...\]'"),
    (["--inner.steps", "many"], r"inner.steps: Couldn't parse 'many' into an int"),
    (["--inner.steps", "0"], r"inner.steps must be an integer >= 1, got 0\."),
])
def test_command_line_errors_name_the_key(args, message):
    with pytest.raises(ValueError, match=message):
        parse(Settings, args)


@pytest.mark.parametrize("data,message", [
    ({"items": [{"name": "a"}, {"nmae": "b"}]}, r"Unknown key 'items\[1\].nmae'; the keys of items\[1\] are \['name'\]"),
    ({"maybe": {"step": 1}}, r"Unknown key 'maybe.step'; the keys of maybe are \['steps', 'ratio'\]"),
    ({"inner": {"ratio": "half"}}, r"inner.ratio: "),
])
def test_data_errors_name_the_key(data, message):
    with pytest.raises(ValueError, match=message):
        decode(Settings, data)
