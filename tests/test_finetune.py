"""Gradient fine-tuning (P>M>F protocol) on tiny random backbones."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers
from tolerances import ROUNDINGS, assert_same_math
from transformers import AutoConfig, AutoModel

from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig
from hf_hyperflow.finetune import (
    DEFAULT_LR_GRID,
    finetune,
    initial_state,
    query_accuracy,
    select_lr,
)
from hf_hyperflow.prefix import FrozenPrefix
from hf_hyperflow.state import HEAD_KEY, parse_state_key

IMAGE = 32




def tiny_vit(first_adapted_block=None, groups=("lora", "shift", "head"), layers=3):
    torch.manual_seed(0)
    config = AutoConfig.for_model("vit", hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=64, image_size=IMAGE, patch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HyperFlowAdapter(AutoModel.from_config(config),
                                HyperFlowConfig(groups=list(groups), r=2, first_adapted_block=first_adapted_block))


def tiny_efficientnet(first_adapted_block=None):
    torch.manual_seed(0)
    backbone = AutoModel.from_config(transformers.TimmWrapperConfig(architecture="test_efficientnet", num_classes=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HyperFlowAdapter(backbone, HyperFlowConfig(groups=["lora", "shift", "head"], r=2, image_size=IMAGE,
                                                          first_adapted_block=first_adapted_block))


@pytest.fixture(scope="module")
def vit():
    return tiny_vit()


@pytest.fixture(scope="module")
def support():
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(10, 3, IMAGE, IMAGE, generator=generator)
    labels = torch.arange(5).repeat(2)
    return pixels, labels


def support_loss(task, pixels, labels) -> float:
    return float(F.cross_entropy(task.logits(pixels), labels))


def backbone_snapshot(adapter):
    return {k: v.detach().clone() for k, v in adapter.backbone.state_dict().items()}


def assert_same_backbone(adapter, snapshot):
    current = adapter.backbone.state_dict()
    assert current.keys() == snapshot.keys()
    for key, value in snapshot.items():
        assert torch.equal(current[key], value), key


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [("lora",), ("shift",), ("head",), ("lora", "shift", "head")])
def test_finetune_lowers_loss_and_moves_only_chosen_groups(vit, support, groups):
    pixels, labels = support
    before = backbone_snapshot(vit)
    result = finetune(vit, pixels, labels, groups=groups, steps=15, lr=3e-2, record_trajectory=True)
    assert_same_backbone(vit, before)
    theta0 = initial_state(vit, 5)
    dt_loss = support_loss(vit.direct_transfer(pixels, labels.tolist()), pixels, labels)
    assert support_loss(result.task, pixels, labels) < dt_loss - 0.01
    assert result.trajectory.num_tasks == 16
    assert len(result.losses) == 15
    assert math.isclose(result.losses[0], _augmented_loss_at_theta0(vit, pixels, labels), rel_tol=1e-5)
    for key in theta0:
        moved = not torch.equal(result.task.state[key], theta0[key])
        chosen = parse_state_key(key)[0] in groups
        assert moved == chosen, key
        assert torch.equal(result.trajectory[key][:1], theta0[key]), key
        assert torch.equal(result.trajectory[key][-1:], result.task.state[key]), key
    # the trajectory really moves step by step
    deltas = [float((result.trajectory.select(k + 1) - result.trajectory.select(k)).squared_norms()) for k in range(15)]
    assert all(d > 0 for d in deltas)


def _augmented_loss_at_theta0(adapter, pixels, labels) -> float:
    """The first step's loss recomputed by hand: clean prototypes at theta_0, DiffAugment(seed 0) queries."""
    from hf_hyperflow.augment import diff_augment
    from hf_hyperflow.backbones import embed
    from hf_hyperflow.heads import class_prototypes, prototype_logits

    generator = torch.Generator().manual_seed(0)
    pseudo = diff_augment(pixels, generator, 0.9)
    with torch.no_grad():
        prototypes = class_prototypes(embed(adapter.backbone, pixels), labels, 5)
        logits = prototype_logits(embed(adapter.backbone, pseudo), prototypes, adapter.drift.logit_scale,
                                  adapter.drift.logit_bias)
    return float(F.cross_entropy(logits, labels))


def test_one_sgd_step_is_minus_lr_times_the_support_gradient(vit, support):
    """optimizer='sgd', steps=1: the head shift moves by -lr times the gradient of the first step's loss, computed
    here by hand; Adam's first step moves every entry by about lr instead."""
    from hf_hyperflow.augment import diff_augment
    from hf_hyperflow.backbones import embed
    from hf_hyperflow.heads import class_prototypes, prototype_logits

    pixels, labels = support
    result = finetune(vit, pixels, labels, groups=("head",), steps=1, lr=0.5, optimizer="sgd")
    assert result.optimizer == "sgd"
    with torch.no_grad():
        prototypes = class_prototypes(embed(vit.backbone, pixels), labels, 5)
        queries = embed(vit.backbone, diff_augment(pixels, torch.Generator().manual_seed(0), 0.9))
    head = torch.zeros_like(prototypes, requires_grad=True)
    logits = prototype_logits(queries, prototypes + head, vit.drift.logit_scale.detach(), vit.drift.logit_bias.detach())
    (gradient,) = torch.autograd.grad(F.cross_entropy(logits, labels), head)
    assert float(gradient.abs().max()) > 0
    assert_same_math(result.task.state[HEAD_KEY][0], -0.5 * gradient)
    adam = finetune(vit, pixels, labels, groups=("head",), steps=1, lr=0.5).task.state[HEAD_KEY][0]
    moved = gradient.abs() > 1e-4  # where Adam's eps (1e-8) is negligible against the gradient
    assert int(moved.sum()) > 10
    assert torch.allclose(adam[moved].abs(), torch.full_like(adam[moved], 0.5), rtol=1e-3)
    with pytest.raises(ValueError, match=r"optimizer must be one of \['adam', 'sgd'\], got 'lbfgs'"):
        finetune(vit, pixels, labels, optimizer="lbfgs")


def test_full_finetuning_leaves_backbone_unchanged_and_task_keeps_weights(vit, support):
    pixels, labels = support
    before = backbone_snapshot(vit)
    dt = vit.direct_transfer(pixels, labels.tolist())
    result = finetune(vit, pixels, labels, groups=("full",), steps=10, lr=1e-3)
    assert_same_backbone(vit, before)
    assert result.task.state is None and result.trajectory is None
    assert support_loss(result.task, pixels, labels) < support_loss(dt, pixels, labels) - 0.01
    # The adapted task embeds with its own weights, not the backbone's.
    assert not torch.allclose(result.task.embed(pixels), dt.embed(pixels), atol=1e-4)
    with pytest.raises(ValueError, match="not an adapter"):
        result.task.save_pretrained("/nonexistent-should-not-be-written")
    # a second task starts again from the pretrained weights: same seed, same result
    again = finetune(vit, pixels, labels, groups=("full",), steps=10, lr=1e-3)
    assert again.losses == result.losses


def test_blocks_finetuning_trains_only_the_adapted_blocks(support):
    adapter = tiny_vit(first_adapted_block=-1)
    pixels, labels = support
    before = backbone_snapshot(adapter)
    dt = adapter.direct_transfer(pixels, labels.tolist())
    result = finetune(adapter, pixels, labels, groups=("blocks",), steps=10, lr=1e-3)
    assert_same_backbone(adapter, before)
    assert result.prefix_cached
    trained = set(result.task._embedder.parameters)
    assert trained and all(".layers.2." in name or "layernorm" in name or "pooler" in name for name in trained)
    assert not any(".layers.0." in name or ".layers.1." in name or "embeddings" in name for name in trained)
    assert support_loss(result.task, pixels, labels) < support_loss(dt, pixels, labels) - 0.01
    # the same as without the cache, up to float rounding
    uncached = finetune(adapter, pixels, labels, groups=("blocks",), steps=10, lr=1e-3, prefix_cache=False)
    assert not uncached.prefix_cached
    expected = uncached.task.embed(pixels)
    torch.testing.assert_close(result.task.embed(pixels), expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_blocks_finetuning_needs_a_frozen_prefix(vit, support):
    pixels, labels = support
    with pytest.raises(ValueError, match=r"fine-tunes the adapted blocks, but this adapter adapts every block"):
        finetune(vit, pixels, labels, groups=("blocks",), steps=1, lr=1e-3)
    with pytest.raises(ValueError, match=r"'blocks' fine-tunes backbone weights and cannot be mixed"):
        finetune(vit, pixels, labels, groups=("blocks", "head"), steps=1, lr=1e-3)


def test_finetune_is_deterministic_per_seed(vit, support):
    pixels, labels = support
    a = finetune(vit, pixels, labels, steps=5, lr=1e-2, seed=3)
    b = finetune(vit, pixels, labels, steps=5, lr=1e-2, seed=3)
    c = finetune(vit, pixels, labels, steps=5, lr=1e-2, seed=4)
    assert a.losses == b.losses
    assert a.losses != c.losses


def test_zero_lr_runs_no_step_and_equals_direct_transfer(vit, support):
    pixels, labels = support
    result = finetune(vit, pixels, labels, steps=4, lr=0.0, record_trajectory=True)
    assert result.losses == []
    theta0 = initial_state(vit, 5)
    for key in theta0:
        assert torch.equal(result.trajectory[key], theta0[key].expand(5, *theta0[key].shape[1:]))
    dt = vit.direct_transfer(pixels, labels.tolist())
    assert_same_math(result.task.logits(pixels), dt.logits(pixels))


def test_initial_state_noise_is_the_starting_point(vit, support):
    pixels, labels = support
    theta0 = initial_state(vit, 5)
    noisy = theta0.map(lambda t: t + 0.01)
    result = finetune(vit, pixels, labels, groups=("shift",), steps=3, lr=1e-2, initial=noisy,
                      record_trajectory=True)
    for key in theta0:
        assert torch.equal(result.trajectory[key][:1], noisy[key])
        if not key.startswith("shift."):
            assert torch.equal(result.task.state[key], noisy[key])


# ------------------------------------------------------------------------------------------------
# Frozen-prefix cache
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_vit, tiny_efficientnet], ids=["vit", "efficientnet"])
@pytest.mark.parametrize("pool", [None, 3])
@pytest.mark.parametrize("groups", [("lora", "shift", "head"), ("head",)])
def test_prefix_cache_matches_uncached_path(make, pool, groups, support):
    # In float64: Adam divides a gradient by its running root mean square (+ eps = 1e-8), so a near-zero gradient's
    # rounding difference g becomes a step of up to lr * g / 1e-8: in float32 ~1e-5 after a few steps on one CPU,
    # more on another, which says nothing about the cache. The bound: 6 steps of lr / 1e-8 times float64 rounding.
    steps, lr = 6, 1e-2
    tolerance = dict(rtol=0, atol=steps * lr / 1e-8 * ROUNDINGS * torch.finfo(torch.float64).eps)  # ~1.4e-6
    adapter = make(first_adapted_block=-1)
    adapter.model.double()
    pixels, labels = support
    pixels = pixels.double()
    cached = finetune(adapter, pixels, labels, groups=groups, steps=steps, lr=lr, augment_pool=pool,
                      record_trajectory=True, prefix_cache=True)
    plain = finetune(adapter, pixels, labels, groups=groups, steps=steps, lr=lr, augment_pool=pool,
                     record_trajectory=True, prefix_cache=False)
    assert cached.prefix_cached and not plain.prefix_cached
    assert len(cached.losses) == 6
    torch.testing.assert_close(torch.tensor(cached.losses), torch.tensor(plain.losses), **tolerance)
    for key in cached.trajectory:
        torch.testing.assert_close(cached.trajectory[key], plain.trajectory[key], **tolerance)
    torch.testing.assert_close(cached.task.logits(pixels), plain.task.logits(pixels), **tolerance)


def test_prefix_cache_skips_frozen_blocks(support):
    adapter = tiny_vit(first_adapted_block=-1, layers=3)
    pixels, labels = support
    prefix = FrozenPrefix.find(adapter.backbone)
    assert [name for name, _ in prefix.blocks] == ["layers.0", "layers.1"]
    # count calls of a module inside each block (a replaced block does not call it)
    calls = {"layers.0.attention": 0, "layers.1.attention": 0, "layers.2.attention": 0}
    handles = [adapter.backbone.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: calls.__setitem__(n, calls[n] + 1)) for n in calls]
    try:
        finetune(adapter, pixels, labels, steps=4, lr=1e-2, augment_pool=2)
    finally:
        for handle in handles:
            handle.remove()
    # frozen blocks run once per prefix computation: clean support + 2 pool copies; the adapted block every step
    # (4 steps + the final prototypes)
    assert calls == {"layers.0.attention": 3, "layers.1.attention": 3, "layers.2.attention": 5}


def test_no_prefix_without_first_adapted_block(vit, support):
    pixels, labels = support
    assert FrozenPrefix.find(vit.backbone) is None
    with pytest.raises(ValueError, match="no block before its first HyperFlow layer"):
        finetune(vit, pixels, labels, steps=1, prefix_cache=True)
    assert not finetune(vit, pixels, labels, steps=1).prefix_cached


def test_efficientnet_prefix_blocks_are_innermost():
    adapter = tiny_efficientnet(first_adapted_block=-1)
    prefix = FrozenPrefix.find(adapter.backbone)
    names = [name for name, _ in prefix.blocks]
    assert names == [f"timm_model.blocks.{i}.0" for i in range(len(names))]
    first_layer = next(n for n, _ in adapter.tuner.hyperflow_layers())
    assert not first_layer.startswith(names[-1] + ".")


# ------------------------------------------------------------------------------------------------
# lr selection, accuracy
# ------------------------------------------------------------------------------------------------
def test_select_lr_table_and_choice(vit, support):
    pixels, labels = support
    episodes = [SimpleNamespace(support_images=pixels, support_labels=labels, query_images=pixels,
                                query_labels=labels)]
    best, table = select_lr(vit, episodes, groups=("head",), grid=(0.0, 1e-1), steps=10)
    assert list(table) == [0.0, 1e-1]
    dt = vit.direct_transfer(pixels, labels.tolist())
    assert table[0.0] == query_accuracy(dt, pixels, labels)
    assert best == max(table, key=lambda lr: (table[lr], -list(table).index(lr)))
    assert DEFAULT_LR_GRID == (0.0, 1e-4, 1e-3, 1e-2)


def test_select_lr_ties_go_to_first_listed(vit, support):
    pixels, labels = support
    episodes = [SimpleNamespace(support_images=pixels, support_labels=labels, query_images=pixels,
                                query_labels=labels)]
    best, table = select_lr(vit, episodes, groups=("head",), grid=(1e-9, 0.0), steps=2)
    assert table[1e-9] == table[0.0] and best == 1e-9


def test_query_accuracy_counts_right_answers(vit, support):
    pixels, labels = support
    task = finetune(vit, pixels, labels, groups=("head",), steps=1, lr=0.0).task
    predictions = task.logits(pixels).argmax(-1)
    assert query_accuracy(task, pixels, labels) == float((predictions == labels).float().mean())
    with pytest.raises(ValueError, match="one label per image"):
        query_accuracy(task, pixels, labels[:3])


# ------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"groups": ("lora", "full")}, ValueError, "cannot be mixed"),
        ({"groups": ("bias",)}, ValueError, "is not valid"),
        ({"groups": ("lora", "lora")}, ValueError, "lists a group twice"),
        ({"steps": 0}, ValueError, "steps must be an integer >= 1"),
        ({"lr": -1.0}, ValueError, "lr must be a number >= 0.0"),
        ({"lr": float("nan")}, ValueError, "lr must be a number"),
        ({"augment_probability": 1.5}, ValueError, r"augment_probability must be a number in \[0.0, 1.0\]"),
        ({"augment_pool": 0}, ValueError, "augment_pool must be an integer >= 1"),
        ({"groups": ("full",), "record_trajectory": True}, ValueError, "record_trajectory needs state groups"),
        ({"classes": ["a", "b"]}, ValueError, "classes has 2 names but the labels have 5 classes"),
    ],
)
def test_bad_arguments(vit, support, kwargs, error, message):
    pixels, labels = support
    with pytest.raises(error, match=message):
        finetune(vit, pixels, labels, **kwargs)


def test_groups_outside_adapter_config(support):
    adapter = tiny_vit(groups=("shift",), layers=2)
    pixels, labels = support
    with pytest.raises(ValueError, match=r"groups \['lora'\] are not part of this adapter's state"):
        finetune(adapter, pixels, labels, groups=("lora",))


def test_bad_support(vit, support):
    pixels, labels = support
    with pytest.raises(TypeError, match="support_pixel_values must be a float tensor"):
        finetune(vit, [pixels], labels)
    with pytest.raises(ValueError, match=r"must have shape \[S, 3, H, W\]"):
        finetune(vit, pixels[0], labels)
    with pytest.raises(TypeError, match="support_labels must be a LongTensor"):
        finetune(vit, pixels, labels.float())
    with pytest.raises(ValueError, match="10 support images but 9 labels"):
        finetune(vit, pixels, labels[:9])
    with pytest.raises(ValueError, match=r"class\(es\) \[2\] have no support image"):
        finetune(vit, pixels, torch.tensor([0, 1, 3, 4, 0, 1, 3, 4, 0, 1]))
    with pytest.raises(ValueError, match="at least two classes"):
        finetune(vit, pixels, torch.zeros(10, dtype=torch.long))


def test_bad_initial_state(vit, support):
    pixels, labels = support
    theta0 = initial_state(vit, 5)
    with pytest.raises(ValueError, match="differing keys"):
        finetune(vit, pixels, labels, initial=TaskStateWithout(theta0, "head.prototypes:"))
    with pytest.raises(ValueError, match="expected"):
        finetune(vit, pixels, labels, initial=initial_state(vit, 4))
    with pytest.raises(ValueError, match="must hold one task"):
        finetune(vit, pixels, labels, initial=theta0.cat([theta0, theta0]))


def TaskStateWithout(state, key):
    from hf_hyperflow.state import TaskState

    return TaskState({k: v for k, v in state.items() if k != key})


def test_finetuned_task_exports_as_stock_peft_lora(support, tmp_path):
    from peft import PeftModel

    from hf_hyperflow.backbones import embed

    adapter = tiny_vit(layers=2)
    pixels, labels = support
    result = finetune(adapter, pixels, labels, groups=("lora", "shift", "head"), steps=5, lr=1e-2)
    result.task.save_pretrained(tmp_path / "task")
    torch.manual_seed(0)
    config = AutoConfig.for_model("vit", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, image_size=IMAGE, patch_size=8)
    fresh = AutoModel.from_config(config)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "task")).eval()
    with torch.no_grad():
        features = embed(loaded.base_model.model, pixels)
    assert_same_math(features, result.task.embed(pixels))
    dt = adapter.direct_transfer(pixels, labels.tolist())
    assert not torch.allclose(features, dt.embed(pixels), atol=1e-4)
