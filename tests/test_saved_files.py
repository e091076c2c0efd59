"""Every file an adapter or a task saves, damaged in every way we can think of: loading gives a clear error that
names the file, leaving the backbone as it was, or computes exactly what was saved; never something else.

Property tests (Hypothesis) draw the damage: a field of a JSON file removed or given another value, a file cut
at any byte, any byte of a file changed. ``pytest --hypothesis-show-statistics`` prints how each case ended.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import IMAGE_SIZE, make_backbone, randomize_drift
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_hyperflow import AdaptedTask, HyperFlowAdapter, HyperFlowConfig

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "preprocessor_config.json")
TASK_FILES = ("hyperflow_task.json", "hyperflow_head.safetensors", "adapter_config.json", "adapter_model.safetensors",
              "preprocessor_config.json")
SUPPORT = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
LABELS = [0, 1, 0, 1]
QUERY = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
CLEAR = (ValueError, TypeError, FileNotFoundError)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An adapter folder and a task folder, and what each computes once loaded."""
    root = tmp_path_factory.mktemp("saved")
    adapter = HyperFlowAdapter(make_backbone("vit"), HyperFlowConfig(steps=2))
    randomize_drift(adapter)
    adapter.save_pretrained(root / "adapter")
    task = adapter.adapt(SUPPORT, LABELS)
    task.save_pretrained(root / "task")
    loaded = HyperFlowAdapter.from_pretrained(make_backbone("vit"), root / "adapter")
    expected = {"adapter": loaded.adapt(SUPPORT, LABELS).logits(QUERY),
                "task": AdaptedTask.from_pretrained(make_backbone("vit"), root / "task").logits(QUERY)}
    return root, expected


def load_and_judge(root: Path, expected: dict, kind: str, damaged: Path) -> str:
    """Load the damaged ``kind`` folder onto a fresh backbone: 'clear error' (a ValueError / TypeError /
    FileNotFoundError naming the damaged file, the backbone unchanged) or 'same result' (exactly what was saved);
    anything else fails the test."""
    backbone = make_backbone("vit")
    before = {name: value.clone() for name, value in backbone.state_dict().items()}
    try:
        if kind == "adapter":
            got = HyperFlowAdapter.from_pretrained(backbone, damaged.parent).adapt(SUPPORT, LABELS).logits(QUERY)
        else:
            got = AdaptedTask.from_pretrained(backbone, damaged.parent).logits(QUERY)
    except CLEAR as error:
        assert damaged.name in str(error), f"the error does not name {damaged.name}: {error}"
        after = backbone.state_dict()
        assert list(after) == list(before), "a failed load left layers in the backbone"
        changed = [name for name in before if not torch.equal(after[name], before[name])]
        assert not changed, f"a failed load changed the backbone: {changed[:3]}"
        return "clear error"
    assert torch.equal(got, expected[kind]), f"{damaged.name} damaged, loaded, and computes something else"
    return "same result"


def damaged_copy(root: Path, kind: str, name: str, tmp: Path) -> Path:
    folder = tmp / kind
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(root / kind, folder)
    return folder / name


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True),
                        st.text(max_size=6), st.lists(st.sampled_from(["lora", "shift", "head", 1]), max_size=3),
                        st.just({}), st.just("32"), st.just("lora"))


@pytest.mark.parametrize("kind, name", [("adapter", n) for n in ADAPTER_FILES if n.endswith(".json")]
                         + [("task", n) for n in TASK_FILES if n.endswith(".json")])
@SETTINGS
@given(data=st.data())
def test_json_field_removed_or_changed(saved, tmp_path, kind, name, data):
    root, expected = saved
    path = damaged_copy(root, kind, name, tmp_path)
    content = json.loads(path.read_text())
    field = data.draw(st.sampled_from(sorted(content)), label="field")
    if data.draw(st.booleans(), label="remove"):
        del content[field]
    else:
        value = data.draw(JSON_VALUES, label="value")
        content[field] = value
    path.write_text(json.dumps(content))
    event(f"{name}: {load_and_judge(root, expected, kind, path)}")


@pytest.mark.parametrize("kind, name", [("adapter", n) for n in ADAPTER_FILES] + [("task", n) for n in TASK_FILES])
@SETTINGS
@given(cut=st.floats(0.0, 0.999))
def test_file_cut_anywhere(saved, tmp_path, kind, name, cut):
    root, expected = saved
    path = damaged_copy(root, kind, name, tmp_path)
    content = path.read_bytes()
    path.write_bytes(content[: int(cut * len(content))])
    event(f"{name}: {load_and_judge(root, expected, kind, path)}")


@pytest.mark.parametrize("kind, name", [("adapter", n) for n in ADAPTER_FILES] + [("task", n) for n in TASK_FILES])
@SETTINGS
@given(where=st.floats(0.0, 0.999), xor=st.integers(1, 255))
def test_any_byte_changed(saved, tmp_path, kind, name, where, xor):
    root, expected = saved
    path = damaged_copy(root, kind, name, tmp_path)
    content = bytearray(path.read_bytes())
    content[int(where * len(content))] ^= xor
    path.write_bytes(bytes(content))
    event(f"{name}: {load_and_judge(root, expected, kind, path)}")


@pytest.mark.parametrize("kind, name", [("adapter", "adapter_model.safetensors"), ("task", "adapter_model.safetensors"),
                                        ("task", "hyperflow_head.safetensors")])
@pytest.mark.parametrize("checksum", [True, False], ids=["with-checksum", "without-checksum"])
@pytest.mark.parametrize("damage", ["tensor-missing", "tensor-reshaped", "tensor-added", "values-changed"])
def test_tensor_missing_reshaped_added_or_changed(saved, tmp_path, kind, name, checksum, damage):
    """A tensor taken out, of another shape, one too many, or other values: refused naming the file, with or
    without the checksum (a file written by an older version has none)."""
    root, expected = saved
    path = damaged_copy(root, kind, name, tmp_path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    tensors = load_file(str(path))
    first = sorted(tensors)[0]
    if damage == "tensor-missing":
        del tensors[first]
    elif damage == "tensor-reshaped":
        tensors[first] = torch.zeros(tensors[first].numel() + 1)
    elif damage == "tensor-added":
        tensors["extra.weight"] = torch.zeros(2)
    else:
        tensors[first] = tensors[first] + 0.5
    if not checksum:
        metadata = {k: v for k, v in metadata.items() if k != "tensors_sha256"}
    save_file(tensors, str(path), metadata=metadata)
    if not checksum and damage == "values-changed":
        # without a checksum, other values are other weights: nothing can tell (the warning says so)
        with pytest.warns(UserWarning, match="no checksum"):
            HyperFlowAdapter.from_pretrained(make_backbone("vit"), path.parent) if kind == "adapter" else \
                AdaptedTask.from_pretrained(make_backbone("vit"), path.parent)
        return
    context = pytest.warns(UserWarning, match="no checksum") if not checksum else _nothing()
    with context:
        assert load_and_judge(root, expected, kind, path) == "clear error"


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


@pytest.mark.parametrize("field", ["steps", "integrator", "lora_alpha", "backbone_fingerprint", "image_size"])
def test_adapter_config_field_missing_is_refused(saved, tmp_path, field):
    root, _ = saved
    path = damaged_copy(root, "adapter", "adapter_config.json", tmp_path)
    content = json.loads(path.read_text())
    del content[field]
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=rf"adapter_config.json lacks the field\(s\) \['{field}'\]|"
                                         rf"adapter_config.json has no value for \['{field}'\]"):
        HyperFlowAdapter.from_pretrained(make_backbone("vit"), path.parent)


@pytest.mark.parametrize("field, value, message", [
    ("groups", "lora", r"groups='lora' must be a list"),
    ("image_size", "32", r"image_size='32' must be an integer"),
    ("steps", 2.5, r"steps=2.5 must be an integer"),
    ("lora_alpha", "8", r"lora_alpha='8' must be a number"),
])
def test_adapter_config_field_of_the_wrong_type_is_refused(saved, tmp_path, field, value, message):
    root, _ = saved
    path = damaged_copy(root, "adapter", "adapter_config.json", tmp_path)
    content = json.loads(path.read_text())
    content[field] = value
    path.write_text(json.dumps(content))
    with pytest.raises((TypeError, ValueError), match=message):
        HyperFlowAdapter.from_pretrained(make_backbone("vit"), path.parent)


def test_task_on_a_backbone_with_other_weights(saved):
    root, _ = saved
    with pytest.raises(ValueError, match="strict_backbone=False"):
        AdaptedTask.from_pretrained(make_backbone("vit", seed=5), root / "task")
    with pytest.warns(UserWarning, match="differ from those"):
        AdaptedTask.from_pretrained(make_backbone("vit", seed=5), root / "task", strict_backbone=False)
