"""Dataset builders by name: the installed entry points, and building the missing folders of a data directory."""

from __future__ import annotations

import pytest

from hf_hyperflow import registry


def test_the_repository_declares_its_builders():
    assert {"glyphs_default", "digits", "fashion_mnist", "tuxpaint_stamps"} <= set(registry.data_builders())


def test_build_missing_builds_only_what_is_not_there(tmp_path, monkeypatch):
    built = []

    class Builder:
        @staticmethod
        def build(folder):
            built.append(folder.name)
            folder.mkdir()

    monkeypatch.setattr(registry, "data_builders", lambda: {"digits": Builder, "emoji": Builder})
    (tmp_path / "emoji").mkdir()
    announced = []
    folders = registry.build_missing(tmp_path, ["digits", "emoji"], announced.append)
    assert folders == [tmp_path / "digits", tmp_path / "emoji"] and built == ["digits"]
    assert announced == [tmp_path / "digits"]
    assert registry.build_missing(tmp_path, ["digits"]) == [tmp_path / "digits"] and built == ["digits"]
    with pytest.raises(LookupError, match=r"no dataset builder is named 'cats'; known: \['digits', 'emoji'\]"):
        registry.build_missing(tmp_path, ["cats"])
