"""One shared tester, parametrised over every supported model_type (tiny random backbones)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import IMAGE_SIZE, MODEL_TYPES, make_backbone, randomize_drift
from safetensors.torch import load_file, save_file

from hf_hyperflow import AdaptedTask, HyperFlowAdapter, HyperFlowConfig
from hf_hyperflow.backbones import BACKBONE_TABLE, embed

WAYS, SHOTS = 3, 2


def support(seed: int = 0, ways: int = WAYS, shots: int = SHOTS):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(ways * shots, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    labels = torch.arange(ways).repeat_interleave(shots)
    return images, labels


def queries(seed: int = 100, n: int = 5):
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def make_adapter(model_type: str, seed: int = 0, random_drift: bool = True, **config):
    adapter = HyperFlowAdapter(make_backbone(model_type, seed), HyperFlowConfig(steps=3, **config))
    if random_drift:
        randomize_drift(adapter)
    return adapter


class TestEveryBackbone:
    def test_injection_and_zero_drift_leave_outputs_unchanged(self, model_type):
        x = queries()
        reference = make_backbone(model_type)
        with torch.no_grad():
            expected = embed(reference, x)
        adapter = make_adapter(model_type, random_drift=False)
        with torch.no_grad():
            after_injection = embed(adapter.backbone, x)
        torch.testing.assert_close(after_injection, expected, rtol=0, atol=0)
        images, labels = support()
        task = adapter.adapt(images, labels)
        # An untrained drift network predicts zero drift: theta stays at theta_0 (B = 0, shifts 0).
        torch.testing.assert_close(task.embed(x), expected, rtol=1e-5, atol=1e-5)
        # ... and a zero head delta: the prototypes are direct transfer's.
        torch.testing.assert_close(task.prototypes, adapter.direct_transfer(images, labels).prototypes,
                                   rtol=1e-5, atol=1e-6)
        assert task.logits(x).shape == (x.shape[0], WAYS)

    def test_random_drift_changes_features(self, model_type):
        adapter = make_adapter(model_type)
        x = queries()
        task = adapter.adapt(*support())
        with torch.no_grad():
            base = embed(adapter.backbone, x)
        assert (task.embed(x) - base).abs().max() > 1e-6, "a non-zero drift must move the adapted features"

    def test_batched_tasks_equal_one_by_one(self, model_type):
        adapter = make_adapter(model_type)
        x = queries()
        # unequal support sizes (3x2 and 2x3 and 4x1) exercise the per-task split path; equal ones the batched path
        tasks = [support(1), support(2, ways=2, shots=3), support(3, ways=4, shots=1)]
        together = adapter.adapt_many(tasks)
        for (images, labels), batched in zip(tasks, together, strict=True):
            alone = adapter.adapt(images, labels)
            torch.testing.assert_close(batched.logits(x), alone.logits(x), rtol=1e-4, atol=1e-5)
        equal = [support(4), support(5)]
        for (images, labels), batched in zip(equal, adapter.adapt_many(equal), strict=True):
            torch.testing.assert_close(batched.logits(x), adapter.adapt(images, labels).logits(x), rtol=1e-4,
                                       atol=1e-5)

    def test_adapter_save_load_round_trip(self, model_type, tmp_path):
        adapter = make_adapter(model_type)
        adapter.save_pretrained(tmp_path / "adapter")
        loaded = HyperFlowAdapter.from_pretrained(make_backbone(model_type), tmp_path / "adapter")
        images, labels = support()
        x = queries()
        torch.testing.assert_close(loaded.adapt(images, labels).logits(x), adapter.adapt(images, labels).logits(x),
                                   rtol=1e-5, atol=1e-5)
        assert not any(p.requires_grad for p in loaded.drift.parameters())

    def test_task_save_load_round_trip(self, model_type, tmp_path):
        adapter = make_adapter(model_type)
        task = adapter.adapt(*support())
        task.save_pretrained(tmp_path / "task")
        loaded = AdaptedTask.from_pretrained(make_backbone(model_type), tmp_path / "task")
        x = queries()
        torch.testing.assert_close(loaded.embed(x), task.embed(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.logits(x), task.logits(x), rtol=1e-5, atol=1e-5)
        assert loaded.classes == task.classes

    def test_merge_single_task_then_restore(self, model_type):
        adapter = make_adapter(model_type)
        task = adapter.adapt(*support())
        x = queries()
        with torch.no_grad():
            before = embed(adapter.backbone, x)
            with adapter.tuner.merged_task(task.state):
                merged = embed(adapter.backbone, x)
            after = embed(adapter.backbone, x)
        torch.testing.assert_close(merged, task.embed(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)

    def test_adapt_uses_no_autograd(self, model_type):
        adapter = make_adapter(model_type)
        adapter.drift.requires_grad_(True)
        saved = []  # every tensor autograd keeps for a backward pass goes through the pack hook
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            task = adapter.adapt(*support())
        assert saved == [], f"adapt recorded an autograd graph ({len(saved)} saved tensors)"
        assert not any(t.requires_grad for t in task.state.values())
        assert not task.prototypes.requires_grad


# ------------------------------------------------------------------------------------------------
# Export to stock PEFT, checked in a process that never imports hf_hyperflow.
# ------------------------------------------------------------------------------------------------
STOCK_PEFT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    cases = json.load(open(sys.argv[1]))
    out = {}
    for case in cases:
        backbone = AutoModel.from_pretrained(case["backbone"]).eval()
        model = PeftModel.from_pretrained(backbone, case["task"]).eval()
        pixels = load_file(case["pixels"])["pixel_values"]
        with torch.no_grad():
            output = model.base_model.model(pixel_values=pixels)
        if case["pooling"] == "cls":
            features = output.last_hidden_state[:, 0]
        else:
            features = output.pooler_output.flatten(1)
        out[case["model_type"]] = features.contiguous()
    assert "hf_hyperflow" not in sys.modules
    save_file(out, sys.argv[2])
    """
)


@pytest.fixture(scope="module")
def stock_peft_features(tmp_path_factory):
    """Features of every model_type's exported task, computed by stock PEFT in a fresh process."""
    root = tmp_path_factory.mktemp("stock_peft")
    cases, expected = [], {}
    for model_type in MODEL_TYPES:
        adapter = make_adapter(model_type, seed=1)
        backbone_dir = root / f"{model_type}-backbone"
        make_backbone(model_type, seed=1).save_pretrained(backbone_dir)
        task = adapter.adapt(*support(7))
        task.save_pretrained(root / f"{model_type}-task")
        x = queries(8)
        save_file({"pixel_values": x}, str(root / f"{model_type}-pixels.safetensors"))
        expected[model_type] = task.embed(x)
        cases.append({"model_type": model_type, "backbone": str(backbone_dir), "task": str(root / f"{model_type}-task"),
                      "pixels": str(root / f"{model_type}-pixels.safetensors"),
                      "pooling": BACKBONE_TABLE[model_type].pooling})
    (root / "cases.json").write_text(json.dumps(cases))
    script = root / "stock.py"
    script.write_text(STOCK_PEFT_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(root / "cases.json"), str(root / "out.safetensors")],
                            capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                              "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return expected, load_file(str(root / "out.safetensors"))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_stock_peft_export_reproduces_task_embed(model_type, stock_peft_features):
    expected, got = stock_peft_features
    torch.testing.assert_close(got[model_type], expected[model_type], rtol=1e-5, atol=1e-5)


def test_exported_config_is_plain_lora(tmp_path):
    adapter = make_adapter("vit")
    adapter.adapt(*support()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["init_lora_weights"] is False
    assert config["lora_bias"] is True
    assert "layers.0.attention.k_proj" in config["target_modules"]  # shift only: zero LoRA + lora_B bias
    assert sorted(config["modules_to_save"]) == sorted(
        [f"layers.{i}.{n}" for i in range(2) for n in ("layernorm_before", "layernorm_after")]
    )
    assert json.loads((tmp_path / "hyperflow_task.json").read_text())["classes"] == [0, 1, 2]
