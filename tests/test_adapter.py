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
from hf_hyperflow.prefix import innermost_blocks

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
# Passes over the support: a few images at a time, tasks in chunks.
# ------------------------------------------------------------------------------------------------
def batch_sizes_seen(module: torch.nn.Module):
    """A list that receives the batch size of every forward pass of ``module`` (and the hook's handle)."""
    seen: list[int] = []
    handle = module.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0]))
    return seen, handle


@pytest.mark.parametrize("model_type", ["timm_wrapper", "vit"])
@pytest.mark.parametrize("first_adapted_block", [-1, None], ids=["frozen prefix", "all blocks adapted"])
def test_first_pass_runs_early_blocks_a_few_images_at_a_time(model_type, first_adapted_block):
    adapter = make_adapter(model_type, first_adapted_block=first_adapted_block)
    images, labels = support(ways=3, shots=3)  # 9 images
    whole = adapter.adapt(images, labels)
    adapter.images_per_pass = 4
    adapter.adapt(images, labels)  # the first call at an image size probes the block sizes with one image
    blocks = [dict(adapter.backbone.named_modules())[name] for name in innermost_blocks(adapter.backbone)]
    first, last = (next(m for m in b.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
                   for b in (blocks[0], blocks[-1]))
    (seen_first, first_hook), (seen_last, last_hook) = batch_sizes_seen(first), batch_sizes_seen(last)
    parts = adapter.adapt(images, labels)
    adapter.direct_transfer(images, labels)
    first_hook.remove(), last_hook.remove()
    # The first block in passes of 4 images (adapt's first pass, its adapted pass, direct transfer's pass); with a
    # frozen prefix the adapted pass reuses the prefix's output instead. The last block takes all images at once in a hierarchical backbone
    # (timm's EfficientNet); in a ViT (blocks of one size) every block runs 4 images at a time.
    assert seen_first == [4, 4, 1] + ([] if first_adapted_block is not None else [9]) + [4, 4, 1]
    assert seen_last == ([9, 9, 9] if model_type == "timm_wrapper" else [4, 4, 1, 9, 4, 4, 1])
    torch.testing.assert_close(parts.prototypes, whole.prototypes, rtol=1e-5, atol=1e-6)
    for key in whole.state:
        torch.testing.assert_close(parts.state[key], whole.state[key], rtol=1e-5, atol=1e-6)


def test_later_blocks_and_adapted_pass_in_bounded_passes():
    """Later blocks take at most ``images_per_late_pass`` images; the adapted pass whole tasks up to that many."""
    adapter = make_adapter("timm_wrapper", first_adapted_block=-1)
    tasks = [support(1, ways=2, shots=2), support(2, ways=3, shots=1), support(3, ways=2, shots=1)]  # 4, 3, 2
    x = queries()
    whole = adapter.adapt_many(tasks)
    adapter.images_per_pass, adapter.images_per_late_pass = 2, 5
    adapter.adapt_many(tasks)  # probes the block sizes once
    last_block = dict(adapter.backbone.named_modules())[innermost_blocks(adapter.backbone)[-1]]
    inner = next(m for m in last_block.modules() if isinstance(m, torch.nn.Conv2d))
    seen, handle = batch_sizes_seen(inner)
    bounded = adapter.adapt_many(tasks)
    handle.remove()
    assert seen == [5, 4, 4, 5]  # first pass: images 0-4, 5-8; adapted pass: task 0, then tasks 1 and 2
    for a, b in zip(bounded, whole, strict=True):
        torch.testing.assert_close(a.logits(x), b.logits(x), rtol=1e-4, atol=1e-5)


def test_adapt_many_in_chunks_equals_one_by_one():
    adapter = make_adapter("timm_wrapper", first_adapted_block=-1)
    tasks = [support(1), support(2, ways=2, shots=3), support(3, ways=4, shots=1), support(4), support(5)]
    x = queries()
    for tasks_per_batch in (2, 5):
        together = adapter.adapt_many(tasks, tasks_per_batch=tasks_per_batch)
        assert len(together) == len(tasks)
        for (images, labels), batched in zip(tasks, together, strict=True):
            torch.testing.assert_close(batched.logits(x), adapter.adapt(images, labels).logits(x), rtol=1e-4,
                                       atol=1e-5)


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
