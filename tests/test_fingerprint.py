"""Content fingerprints: the same content gives the same digest whatever the dtype, device or layout; any change
in a name or a value changes it."""

from __future__ import annotations

import hashlib

import torch

from hf_hyperflow.fingerprint import fingerprint, tensors_fingerprint


def test_a_fingerprint_is_sha256_of_the_parts():
    expected = hashlib.sha256(b"ab" + torch.tensor([1.0, 2.0]).numpy().tobytes() + b"\x00").hexdigest()[:16]
    assert fingerprint(["a", "b", torch.tensor([1.0, 2.0], dtype=torch.float64), b"\x00"]) == expected


def test_tensors_fingerprint_is_content_based():
    weights = torch.arange(6.0).reshape(2, 3)
    digest = tensors_fingerprint({"w": weights, "b": torch.ones(2)})
    assert digest == tensors_fingerprint({"b": torch.ones(2), "w": weights.t().contiguous().t()})  # order, layout
    assert digest == tensors_fingerprint({"w": weights.to(torch.bfloat16), "b": torch.ones(2)})  # exact in bf16
    assert digest != tensors_fingerprint({"w": weights + 1e-3, "b": torch.ones(2)})
    assert digest != tensors_fingerprint({"v": weights, "b": torch.ones(2)})
    assert len(digest) == 16
