"""HyperFlowConfig: validation messages and help on every field."""

from __future__ import annotations

import pytest

from hf_hyperflow import HyperFlowConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(groups=[]), "non-empty list"),
        (dict(groups=["lora", "bias"]), r"groups=\['lora', 'bias'\] is not valid"),
        (dict(integrator="rk5"), "integrator='rk5' is unknown"),
        (dict(steps=0), "steps=0 must be a positive integer"),
        (dict(r=0), "r=0 must be a positive integer"),
        (dict(lora_alpha=-1.0), "lora_alpha=-1.0 must be > 0"),
        (dict(time_embedding_size=15), "must be even"),
        (dict(domain_gate=0.0, statistics_size=4), r"domain_gate=0.0 must be > 0"),
        (dict(domain_gate=float("nan"), statistics_size=4), r"domain_gate=nan must be > 0"),
        (dict(domain_gate=2.0), "statistics_size=0"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HyperFlowConfig(**kwargs)


def test_domain_gate_is_a_number_or_none():
    with pytest.raises(TypeError, match="domain_gate='far' must be a number or None"):
        HyperFlowConfig(domain_gate="far", statistics_size=4)
    assert HyperFlowConfig(domain_gate=2, statistics_size=4).domain_gate == 2
    assert HyperFlowConfig().domain_gate is None


def test_config_fields_have_help():
    import dataclasses

    own = {f.name for f in dataclasses.fields(HyperFlowConfig)} - {
        f.name for f in dataclasses.fields(__import__("peft").PeftConfig)}
    for field in dataclasses.fields(HyperFlowConfig):
        if field.name in own:
            assert field.metadata.get("help"), field.name
