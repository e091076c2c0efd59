"""Choosing how far to integrate from the support set: leave-one-out loss and the choice of the point."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_hyperflow.heads import class_prototypes, prototype_logits
from hf_hyperflow.stopping import any_task_judged, candidate_steps, choose_point, leave_one_out_loss


def test_candidate_steps():
    assert candidate_steps(8, 3) == [0, 4, 8]
    assert candidate_steps(8, 2) == [0, 8]
    assert candidate_steps(8, 5) == [0, 2, 4, 6, 8]
    assert candidate_steps(2, 5) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"points must be an integer >= 2"):
        candidate_steps(8, 1)
    with pytest.raises(ValueError, match=r"steps must be a positive integer"):
        candidate_steps(0, 3)


def reference_loss(features, labels, num_classes, head_shift, scale, bias):
    """Leave-one-out by brute force: drop each image, rebuild the prototypes, classify it."""
    losses = []
    for i in range(len(labels)):
        keep = torch.arange(len(labels)) != i
        if int((labels[keep] == labels[i]).sum()) == 0:
            continue
        prototypes = class_prototypes(features[keep], labels[keep], num_classes)
        if head_shift is not None:
            prototypes = prototypes + head_shift
        logits = prototype_logits(features[i : i + 1], prototypes, scale, bias)
        losses.append(F.cross_entropy(logits, labels[i : i + 1]))
    return torch.stack(losses).mean() if losses else None


@pytest.mark.parametrize("with_head", [False, True])
def test_leave_one_out_matches_brute_force(with_head):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(11, 6, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 1])  # class 3 has one image: it does not count
    head = torch.randn(4, 6, generator=generator, dtype=torch.float64) * 0.3 if with_head else None
    got = leave_one_out_loss(features, labels, 4, head, 10.0, 0.1)
    expected = reference_loss(features.float(), labels, 4, None if head is None else head.float(), 10.0, 0.1)
    eps = torch.finfo(torch.float32).eps
    assert math.isclose(float(got), float(expected), rel_tol=64 * eps, abs_tol=64 * eps)


def test_leave_one_out_is_none_when_every_class_has_one_image():
    assert leave_one_out_loss(torch.randn(3, 4), torch.tensor([0, 1, 2]), 3, None, 10.0, 0.0) is None


def test_separable_features_have_a_lower_loss():
    labels = torch.arange(3).repeat_interleave(4)
    centres = torch.eye(3, 5)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(12, 5, generator=generator)
    tight = leave_one_out_loss(centres[labels] + 0.05 * noise, labels, 3, None, 10.0, 0.0)
    loose = leave_one_out_loss(centres[labels] + 2.0 * noise, labels, 3, None, 10.0, 0.0)
    assert float(tight) < float(loose)


def test_choose_point_prefers_the_earliest_on_ties():
    assert choose_point([torch.tensor(0.5), torch.tensor(0.3), torch.tensor(0.3)]) == 1
    assert choose_point([torch.tensor(0.2), torch.tensor(0.2)]) == 0
    assert choose_point([torch.tensor(0.9), torch.tensor(0.8), torch.tensor(0.1)]) == 2
    with pytest.raises(ValueError, match="at least one point"):
        choose_point([])


# -- steps="auto" in the adapter ----------------------------------------------------------------------
from conftest import IMAGE_SIZE, make_backbone, randomize_drift  # noqa: E402

from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig  # noqa: E402


def make_adapter(model_type, scale, points=3, **config):
    adapter = HyperFlowAdapter(make_backbone(model_type), HyperFlowConfig(steps=4, stopping_points=points, **config))
    randomize_drift(adapter, scale=scale)
    return adapter


def episode(seed, ways=3, shots=3):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(ways * shots, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
            torch.arange(ways).repeat_interleave(shots))


def support_loss(task, images, labels):
    head = task.state["head.prototypes:"][0] if task.state is not None else None
    return float(leave_one_out_loss(task.embed(images), labels, int(labels.max()) + 1, head, task.logit_scale,
                                    task.logit_bias))


@pytest.mark.parametrize("model_type", ["vit", "timm_wrapper"])
@pytest.mark.parametrize("seed", range(4))
def test_auto_between_direct_transfer_and_the_whole_path(model_type, seed):
    """With two candidate points the choice is direct transfer or the fixed-steps task, whichever has the
    lower leave-one-out support loss, and the task is exactly that one."""
    adapter = make_adapter(model_type, 0.5, points=2)
    images, labels = episode(seed)
    queries = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(9))
    candidates = [adapter.direct_transfer(images, labels), adapter.adapt(images, labels)]
    losses = [support_loss(t, images, labels) for t in candidates]
    task = adapter.adapt(images, labels, steps="auto")
    best = min(range(2), key=lambda i: (losses[i], i))
    assert task.integration_time == float(best)
    expected = candidates[best].logits(queries)
    torch.testing.assert_close(task.logits(queries), expected, rtol=0,
                               atol=64 * torch.finfo(torch.float32).eps * float(expected.abs().max()))
    assert candidates[1].integration_time == 1.0


def test_auto_picks_points_of_the_path():
    adapter = make_adapter("vit", 0.5)
    times = {adapter.adapt(*episode(seed), steps="auto").integration_time for seed in range(8)}
    assert times <= {0.0, 0.5, 1.0} and len(times) >= 2


def test_auto_batched_equals_one_by_one_and_one_shot_tasks_integrate_fully():
    adapter = make_adapter("timm_wrapper", 0.5)
    tasks = [episode(2), episode(3, ways=4, shots=2), episode(4, ways=3, shots=1)]
    batched = adapter.adapt_many(tasks, steps="auto")
    for (images, labels), task in zip(tasks, batched, strict=True):
        alone = adapter.adapt(images, labels, steps="auto")
        assert alone.integration_time == task.integration_time
        scale = float(alone.prototypes.abs().max())
        torch.testing.assert_close(task.prototypes, alone.prototypes, rtol=0,
                                   atol=1e3 * torch.finfo(torch.float32).eps * scale)
    assert batched[2].integration_time == 1.0  # one image per class: nothing to judge by, the whole path


def test_any_task_judged():
    labels = torch.tensor([0, 1, 2, 0, 1])
    assert not any_task_judged(labels, [3, 2])  # tasks 0,1,2 and 0,1: one image per class in each
    assert any_task_judged(labels, [5])  # one task where classes 0 and 1 have two images
    assert any_task_judged(torch.tensor([0, 1, 2, 0, 0, 1]), [3, 3])  # the second task has class 0 twice


def test_auto_on_one_shot_tasks_is_the_fixed_path():
    """With one image per class the rule has nothing to judge by: no pass at the path's other points."""
    adapter = make_adapter("timm_wrapper", 0.5)
    images, labels = episode(5, ways=4, shots=1)
    adapter.adapt(images, labels, stopping="fixed")  # a first call probes the block sizes of this image shape once
    _, layer = adapter.tuner.hyperflow_layers()[-1]
    calls = []
    handle = layer.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    auto = adapter.adapt(images, labels, steps="auto")
    passes_auto, calls[:] = len(calls), []
    fixed = adapter.adapt(images, labels, stopping="fixed")
    handle.remove()
    assert passes_auto == len(calls) == 2  # the first pass and one adapted pass
    assert auto.integration_time == fixed.integration_time == 1.0
    torch.testing.assert_close(auto.prototypes, fixed.prototypes, rtol=0, atol=0)


def test_steps_must_be_positive_int_or_auto():
    adapter = make_adapter("vit", 0.05)
    images, labels = episode(0)
    for bad in (0, -1, "fast", 2.5, True):
        with pytest.raises(ValueError, match=r"steps must be a positive integer, 'auto' or None"):
            adapter.adapt(images, labels, steps=bad)
    with pytest.raises(ValueError, match=r"stopping='sometimes' is unknown"):
        HyperFlowConfig(stopping="sometimes")


def test_stopping_argument_replaces_the_configs_rule():
    """An adapter saved with stopping='auto' integrates to t=1 when asked for stopping='fixed' (as an adapter
    with stopping='fixed' does), and chooses its point when the config says auto."""
    auto = make_adapter("vit", 0.5, stopping="auto")
    fixed = make_adapter("vit", 0.5)
    fixed.drift.load_state_dict(auto.drift.state_dict())
    queries = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(9))
    times = set()
    for seed in range(6):
        images, labels = episode(seed)
        chosen = auto.adapt(images, labels)
        assert chosen.integration_time == auto.adapt(images, labels, steps="auto").integration_time
        times.add(chosen.integration_time)
        whole = auto.adapt(images, labels, stopping="fixed")
        assert whole.integration_time == 1.0
        expected = fixed.adapt(images, labels).logits(queries)
        torch.testing.assert_close(whole.logits(queries), expected, rtol=0,
                                   atol=64 * torch.finfo(torch.float32).eps * float(expected.abs().max()))
    assert times != {1.0}  # the auto rule did stop some tasks earlier


def test_stopping_argument_is_checked():
    adapter = make_adapter("vit", 0.05)
    images, labels = episode(0)
    with pytest.raises(ValueError, match=r"stopping must be 'fixed', 'auto' or None"):
        adapter.adapt(images, labels, stopping="early")
    with pytest.raises(ValueError, match=r"cannot be combined with stopping='fixed'"):
        adapter.adapt(images, labels, steps="auto", stopping="fixed")


@pytest.mark.parametrize("first_adapted_block", [-1, None], ids=["frozen prefix", "all blocks adapted"])
def test_auto_matches_the_rule_by_brute_force(first_adapted_block):
    """The adapter passes the later candidate points together, reusing the first pass; the rule computed by
    brute force (each point's support through the whole backbone with that point's delta) picks the same point
    and the same prototypes."""
    from hf_hyperflow.backbones import embed
    from hf_hyperflow.heads import class_prototypes

    adapter = make_adapter("vit", 0.5, points=3, first_adapted_block=first_adapted_block)
    drift, picked = adapter.drift, set()
    for seed in range(8):
        images, labels = episode(seed)
        with torch.no_grad():
            features, statistics, _, _ = adapter._first_pass(images, labels, [9], [3])
            path = drift.integrate(drift.encode_tasks(features, labels, [9], [3], statistics), 4, return_path=True)
            losses, prototypes = [], []
            for k in candidate_steps(4, 3):
                with adapter.tuner.task_deltas(path[k], [9]):
                    features = embed(adapter.backbone, images)
                head = path[k]["head.prototypes:"][0, :3]
                losses.append(leave_one_out_loss(features, labels, 3, head, drift.logit_scale, drift.logit_bias))
                prototypes.append(class_prototypes(features, labels, 3) + head)
        best = choose_point(losses)
        task = adapter.adapt(images, labels, steps="auto")
        picked.add(best)
        assert task.integration_time == best / 2
        scale = float(prototypes[best].abs().max())
        torch.testing.assert_close(task.prototypes, prototypes[best], rtol=0,
                                   atol=256 * torch.finfo(torch.float32).eps * scale)
    assert len(picked) >= 2
