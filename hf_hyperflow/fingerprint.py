"""Content fingerprints: the first 16 hex digits of a sha256 over strings and tensors."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch

__all__ = ["fingerprint", "tensors_fingerprint", "tensors_sha256"]


def fingerprint(parts: Iterable[str | bytes | torch.Tensor]) -> str:
    """sha256 (first 16 hex digits) of ``parts`` in order: strings as UTF-8, bytes as they are, tensors as their
    float32 values (C order, on CPU), so that the dtype, device and memory layout of a tensor do not change it."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(part.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        elif isinstance(part, bytes):
            digest.update(part)
        else:
            digest.update(part.encode("utf-8"))
    return digest.hexdigest()[:16]


def tensors_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """:func:`fingerprint` of named tensors in name order: ``name_1, tensor_1, name_2, tensor_2, ...``."""
    return fingerprint(part for name in sorted(tensors) for part in (name, tensors[name]))


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """The full sha256 (64 hex digits) of named tensors exactly as stored: in name order, each tensor's name, dtype,
    shape and raw bytes (C order, on CPU). Unlike :func:`fingerprint`, a change of dtype or of any bit changes it:
    it is the checksum saved with a file's tensors."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
