"""One shared tester, parametrised over every supported model_type (tiny random backbones)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_backbone, randomize_drift
from conftest import make_random_adapter as make_adapter
from conftest import random_pixels as pixels
from conftest import random_queries as queries
from conftest import random_support as support
from tolerances import assert_same_math

from hf_hyperflow import AdaptedTask, HyperFlowAdapter, HyperFlowConfig
from hf_hyperflow.backbones import embed
from hf_hyperflow.prefix import innermost_blocks
from hf_hyperflow.stopping import candidate_steps
from hf_hyperflow.tuner.layer import HyperFlowLayer

WAYS = 3  # random_support's default


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
        assert_same_math(task.embed(x), expected)
        # ... and a zero head delta: the prototypes are direct transfer's.
        assert_same_math(task.prototypes, adapter.direct_transfer(images, labels).prototypes)
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
            assert_same_math(batched.logits(x), alone.logits(x))
        equal = [support(4), support(5)]
        for (images, labels), batched in zip(equal, adapter.adapt_many(equal), strict=True):
            assert_same_math(batched.logits(x), adapter.adapt(images, labels).logits(x))

    def test_adapter_save_load_round_trip(self, model_type, tmp_path):
        adapter = make_adapter(model_type)
        adapter.save_pretrained(tmp_path / "adapter")
        loaded = HyperFlowAdapter.from_pretrained(make_backbone(model_type), tmp_path / "adapter")
        images, labels = support()
        x = queries()
        assert_same_math(loaded.adapt(images, labels).logits(x), adapter.adapt(images, labels).logits(x))
        assert not any(p.requires_grad for p in loaded.drift.parameters())

    def test_task_save_load_round_trip(self, model_type, tmp_path):
        adapter = make_adapter(model_type)
        task = adapter.adapt(*support())
        task.save_pretrained(tmp_path / "task")
        loaded = AdaptedTask.from_pretrained(make_backbone(model_type), tmp_path / "task")
        x = queries()
        assert_same_math(loaded.embed(x), task.embed(x))
        assert_same_math(loaded.logits(x), task.logits(x))
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
        assert_same_math(merged, task.embed(x))
        assert_same_math(after, before)

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
    # A block's first Linear / Conv2d, or its HyperFlow layer where adapted (with one task set, the layer runs its
    # base layer's math without calling the base module).
    first, last = (next(m for m in b.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, HyperFlowLayer)))
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
    assert_same_math(parts.prototypes, whole.prototypes)
    for key in whole.state:
        assert_same_math(parts.state[key], whole.state[key])


def test_later_blocks_and_adapted_pass_in_bounded_passes():
    """Later blocks take at most ``images_per_late_pass`` images; the adapted pass whole tasks up to that many."""
    adapter = make_adapter("timm_wrapper", first_adapted_block=-1)
    tasks = [support(1, ways=2, shots=2), support(2, ways=3, shots=1), support(3, ways=2, shots=1)]  # 4, 3, 2
    x = queries()
    whole = adapter.adapt_many(tasks)
    adapter.images_per_pass, adapter.images_per_late_pass = 2, 5
    adapter.adapt_many(tasks)  # probes the block sizes once
    last_block = dict(adapter.backbone.named_modules())[innermost_blocks(adapter.backbone)[-1]]
    inner = next(m for m in last_block.modules() if isinstance(m, (torch.nn.Conv2d, HyperFlowLayer)))
    seen, handle = batch_sizes_seen(inner)
    bounded = adapter.adapt_many(tasks)
    handle.remove()
    assert seen == [5, 4, 4, 5]  # first pass: images 0-4, 5-8; adapted pass: task 0, then tasks 1 and 2
    for a, b in zip(bounded, whole, strict=True):
        assert_same_math(a.logits(x), b.logits(x))


@pytest.mark.parametrize("model_type", ["timm_wrapper", "vit"])
def test_module_statistics_from_bounded_passes_equal_one_pass(model_type):
    """The input moments behind module statistics add up over the first pass's bounded passes of whole images."""
    adapter = make_adapter(model_type, first_adapted_block=-1, statistics_size=3)
    tasks = [support(1, ways=2, shots=3), support(2, ways=3, shots=2), support(3, ways=2, shots=2)]  # 6, 6, 4
    x = queries()
    whole = adapter.adapt_many(tasks)
    adapter.images_per_pass, adapter.images_per_late_pass = 2, 5
    bounded = adapter.adapt_many(tasks)
    for a, b in zip(bounded, whole, strict=True):
        for key in b.state:
            assert_same_math(a.state[key], b.state[key])
        assert_same_math(a.logits(x), b.logits(x))


def test_adapt_many_in_chunks_equals_one_by_one():
    adapter = make_adapter("timm_wrapper", first_adapted_block=-1)
    tasks = [support(1), support(2, ways=2, shots=3), support(3, ways=4, shots=1), support(4), support(5)]
    x = queries()
    for tasks_per_batch in (2, 5):
        together = adapter.adapt_many(tasks, tasks_per_batch=tasks_per_batch)
        assert len(together) == len(tasks)
        for (images, labels), batched in zip(tasks, together, strict=True):
            assert_same_math(batched.logits(x), adapter.adapt(images, labels).logits(x))


# ------------------------------------------------------------------------------------------------ domain gate
def gated_adapter(gate: float | None):
    """A tiny adapter reading module statistics, with a domain reference fitted on four random tasks."""
    from hf_hyperflow.domain_reference import DomainReference, statistics_vector

    adapter = make_adapter("timm_wrapper", first_adapted_block=-1, statistics_size=3, domain_gate=gate)
    vectors = []
    for seed in range(10, 14):
        images, labels = support(seed)
        _, statistics = adapter.task_inputs(images, labels, [len(labels)], [WAYS])
        vectors.append(statistics_vector(statistics, adapter.drift.modules_order))
    adapter.domain_reference = DomainReference.fit({"random": torch.cat(vectors)})
    return adapter


@pytest.mark.parametrize("stopping", ["fixed", "auto"])
def test_domain_gate_keeps_direct_transfer_beyond_it(stopping):
    """Tasks farther than the gate get theta_0 (direct transfer's logits, integration_time 0); nearer ones are
    adapted as without a gate; each task reports its distance, alone or in a batch."""
    adapter = gated_adapter(None)
    x = queries()
    tasks = [support(1), support(2, ways=2, shots=3), support(3)]
    ungated = adapter.adapt_many(tasks, stopping=stopping)
    distances = [task.domain_distance for task in ungated]
    assert all(d > 0 for d in distances) and len(set(distances)) == 3
    adapter.config.domain_gate = sorted(distances)[1]  # the farthest task only is beyond it
    passed = []
    joint_pass = adapter._joint_pass
    adapter._joint_pass = lambda images, states, *rest: (passed.append(images.shape[0] * len(states))
                                                         or joint_pass(images, states, *rest))
    gated = adapter.adapt_many(tasks, stopping=stopping)
    del adapter._joint_pass
    near = sum(len(labels) for (_, labels), d in zip(tasks, distances, strict=True) if d <= adapter.config.domain_gate)
    points = len(candidate_steps(adapter.config.steps, adapter.config.stopping_points)) - 1 if stopping == "auto" else 1
    assert sum(passed) == near * points  # the adapted passes leave the far task out
    for (images, labels), before, after in zip(tasks, ungated, gated, strict=True):
        assert after.domain_distance == pytest.approx(before.domain_distance)
        if before.domain_distance > adapter.config.domain_gate:
            assert after.integration_time == 0.0
            assert_same_math(after.logits(x), adapter.direct_transfer(images, labels).logits(x))
        else:
            assert after.integration_time == before.integration_time
            assert_same_math(after.logits(x), before.logits(x))
    adapter.config.domain_gate = min(distances) / 2  # every task beyond: no integration at all
    for (images, labels), task in zip(tasks, adapter.adapt_many(tasks, stopping=stopping), strict=True):
        assert task.integration_time == 0.0
        assert_same_math(task.logits(x), adapter.direct_transfer(images, labels).logits(x))


def test_domain_reference_is_saved_and_loaded_with_the_adapter(tmp_path):
    adapter = gated_adapter(0.5)
    adapter.save_pretrained(tmp_path / "gated")
    loaded = HyperFlowAdapter.from_pretrained(make_backbone("timm_wrapper"), tmp_path / "gated")
    assert loaded.config.domain_gate == 0.5 and loaded.domain_reference.sources == ["random"]
    torch.testing.assert_close(loaded.domain_reference.centres, adapter.domain_reference.centres, rtol=0, atol=0)
    images, labels = support(1)
    assert loaded.adapt(images, labels).domain_distance == pytest.approx(adapter.adapt(images, labels).domain_distance)
    (tmp_path / "gated" / "domain_reference.safetensors").unlink()
    with pytest.warns(UserWarning, match="domain_gate=0.5 but holds no domain_reference.safetensors"):
        bare = HyperFlowAdapter.from_pretrained(make_backbone("timm_wrapper"), tmp_path / "gated")
    assert bare.domain_reference is None and bare.adapt(images, labels).domain_distance is None


# ------------------------------------------------------------------------------------------------ files
def test_adapter_for_another_backbone(adapter, tmp_path):
    adapter.save_pretrained(tmp_path / "vit-adapter")
    with pytest.raises(ValueError, match="made for a 'vit' backbone, but the backbone given is a 'dinov2'"):
        HyperFlowAdapter.from_pretrained(make_backbone("dinov2"), tmp_path / "vit-adapter")
    # same model_type, other weights: the content fingerprint catches it
    with pytest.raises(ValueError, match="strict_backbone=False"):
        HyperFlowAdapter.from_pretrained(make_backbone("vit", seed=5), tmp_path / "vit-adapter")
    with pytest.warns(UserWarning, match="differ from those this HyperFlow adapter was made with"):
        HyperFlowAdapter.from_pretrained(make_backbone("vit", seed=5), tmp_path / "vit-adapter", strict_backbone=False)


def test_adapter_for_another_feature_size(tmp_path):
    from transformers import AutoConfig, AutoModel

    adapter = HyperFlowAdapter(make_backbone("vit"), HyperFlowConfig(steps=1))
    adapter.save_pretrained(tmp_path / "a")
    wider = AutoModel.from_config(AutoConfig.for_model(
        "vit", hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8))
    with pytest.raises(ValueError, match="differ from those this HyperFlow adapter|features of size 32"):
        HyperFlowAdapter.from_pretrained(wider, tmp_path / "a", strict_backbone=False)


def test_truncated_safetensors(adapter, tmp_path):
    adapter.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="adapter_model.safetensors is corrupt or truncated"):
        HyperFlowAdapter.from_pretrained(make_backbone("vit"), tmp_path / "adapter")
    adapter.adapt(pixels(4), [0, 1, 0, 1]).save_pretrained(tmp_path / "task")
    head = tmp_path / "task" / "hyperflow_head.safetensors"
    head.write_bytes(head.read_bytes()[:20])
    with pytest.raises(ValueError, match="hyperflow_head.safetensors is corrupt or truncated"):
        AdaptedTask.from_pretrained(make_backbone("vit"), tmp_path / "task")


def test_missing_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        HyperFlowAdapter.from_pretrained(make_backbone("vit"), tmp_path / "empty")


@pytest.mark.parametrize("model_type", ["vit", "timm_wrapper"])
def test_adapt_runs_the_frozen_prefix_once_and_matches_the_uncached_path(model_type):
    adapter = HyperFlowAdapter(make_backbone(model_type), HyperFlowConfig(first_adapted_block=-1, steps=2))
    randomize_drift(adapter)
    prefix = adapter.frozen_prefix()
    assert prefix is not None
    inner = next(m for m in prefix.blocks[0][1].modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    images, labels = pixels(4), [0, 1, 0, 1]
    adapter.adapt(images, labels)  # a first call probes the block sizes of this image shape once
    calls = []
    handle = inner.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    cached = adapter.adapt(images, labels)
    assert sum(calls) == 4, "the frozen prefix sees each image once, for the theta_0 pass and the adapted pass"
    handle.remove()
    adapter._frozen_prefix = None  # the uncached path
    uncached = adapter.adapt(images, labels)
    assert_same_math(cached.prototypes, uncached.prototypes)
    for key in cached.state:
        assert_same_math(cached.state[key], uncached.state[key])


