"""How far a task's support set lies from the domains the drift network was trained on.

The drift network reads, per adapted module, statistics of the module's input over the support set (per channel:
the standardised mean, the standardised log variance and the spread of the class means; see
:func:`hf_hyperflow.drift.input_statistics`). A :class:`DomainReference` holds, for every training source, the
mean and the spread of those statistics over many of its training episodes. A task's distance to a source is the
mean over all channels' statistics of the squared z-score against that source, each capped at
:data:`Z_SQUARED_CAP` (a few channels far off do not decide alone); its distance to the training domains is the
smallest over the sources. Where it exceeds the config's ``domain_gate``, :meth:`HyperFlowAdapter.adapt` keeps
direct transfer (t = 0): the drift was never shown such data, and on object photographs it was measured to harm
(``benchmarks/experiments.md``).

Saved next to the adapter as ``domain_reference.safetensors`` (tensors ``centres`` and ``spreads``, both
``[K, F]``; the source names and episode count in its metadata).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .io import load_safetensors_checked, save_safetensors

__all__ = ["DOMAIN_REFERENCE_FILE", "DomainReference", "Z_SQUARED_CAP", "statistics_vector"]

DOMAIN_REFERENCE_FILE = "domain_reference.safetensors"
Z_SQUARED_CAP = 9.0  # a channel counts at most as much as three standard deviations off
SPREAD_FLOOR = 0.1  # a source's spread is at least this share of the spread over all sources (near-constant channels)


def statistics_vector(module_statistics: Mapping[str, torch.Tensor], modules: Sequence[str]) -> torch.Tensor:
    """``Tensor[T, F]``: each task's module statistics (``module -> Tensor[T, 3 * C_m]``) side by side, in the order
    of ``modules`` (the drift network's ``modules_order``)."""
    return torch.cat([module_statistics[m].float() for m in modules], dim=1)


@dataclass
class DomainReference:
    """Per training source, the centre and spread of the support statistics of its episodes.

    Attributes:
        sources: the K source names.
        centres: ``Tensor[K, F]``, the mean statistics vector of each source's episodes.
        spreads: ``Tensor[K, F]``, their standard deviation, floored (:data:`SPREAD_FLOOR`).
        episodes: episodes per source the reference was fitted on.
        backbone_fingerprint: content fingerprint of the backbone whose module inputs were measured (the
            statistics at theta_0 depend on the backbone only); None if unknown.
    """

    sources: list[str]
    centres: torch.Tensor
    spreads: torch.Tensor
    episodes: int
    backbone_fingerprint: str | None = None

    @classmethod
    def fit(cls, statistics: Mapping[str, torch.Tensor], backbone_fingerprint: str | None = None) -> DomainReference:
        """From ``source name -> Tensor[E, F]`` (the statistics vectors of E >= 2 episodes of that source).

        Raises:
            ValueError: no source, fewer than two episodes of one, vectors of different sizes or not finite.
        """
        if not statistics:
            raise ValueError("A domain reference needs the statistics of at least one training source.")
        sizes = {name: tuple(v.shape) for name, v in statistics.items()}
        if any(len(s) != 2 or s[0] < 2 for s in sizes.values()) or len({s[1] for s in sizes.values()}) != 1:
            raise ValueError(f"Each source needs a [episodes >= 2, F] tensor of one common F, got {sizes}.")
        values = {name: v.detach().float().cpu() for name, v in statistics.items()}
        if not all(bool(torch.isfinite(v).all()) for v in values.values()):
            raise ValueError("The support statistics hold NaN or inf: the backbone's activations overflowed; fit the "
                             "reference in float32.")
        pooled = torch.cat(list(values.values())).std(0)
        centres = torch.stack([v.mean(0) for v in values.values()])
        spreads = torch.stack([v.std(0) for v in values.values()]) + SPREAD_FLOOR * pooled + 1e-6
        return cls(list(values), centres, spreads, min(len(v) for v in values.values()), backbone_fingerprint)

    def distance(self, vectors: torch.Tensor) -> torch.Tensor:
        """``Tensor[T]``: each task's distance to the nearest source (mean capped squared z-score).

        Args:
            vectors: ``Tensor[T, F]``, from :func:`statistics_vector`.
        """
        if vectors.ndim != 2 or vectors.shape[1] != self.centres.shape[1]:
            raise ValueError(f"Expected statistics vectors of shape [T, {self.centres.shape[1]}], got "
                             f"{list(vectors.shape)}: the reference was fitted for another adapter or backbone.")
        z = (vectors.float()[:, None] - self.centres.to(vectors.device)) / self.spreads.to(vectors.device)
        return z.pow(2).clamp_max(Z_SQUARED_CAP).mean(-1).amin(1)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (safetensors with its checksum; source names and episode count in the metadata)."""
        metadata = {"format": "pt", "sources": json.dumps(self.sources), "episodes": str(self.episodes)}
        if self.backbone_fingerprint is not None:
            metadata["backbone_fingerprint"] = self.backbone_fingerprint
        save_safetensors({"centres": self.centres, "spreads": self.spreads}, path, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DomainReference:
        """Read a reference written by :meth:`save` (its checksum checked).

        Raises:
            FileNotFoundError / ValueError: no file, a damaged one, or one that is not a domain reference.
        """
        tensors = load_safetensors_checked(path)
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        try:
            sources, episodes = json.loads(metadata["sources"]), int(metadata["episodes"])
            centres, spreads = tensors["centres"], tensors["spreads"]
        except (KeyError, ValueError) as error:
            raise ValueError(f"{path} is not a domain reference (missing {error}); fit it again with "
                             "recipes/domain_reference.py.") from None
        if centres.shape != spreads.shape or centres.ndim != 2 or centres.shape[0] != len(sources):
            raise ValueError(f"{path} holds centres {list(centres.shape)} and spreads {list(spreads.shape)} for "
                             f"{len(sources)} sources: fit it again with recipes/domain_reference.py.")
        return cls(list(sources), centres, spreads, episodes, metadata.get("backbone_fingerprint"))

    @classmethod
    def load_if_present(cls, folder: str | os.PathLike, backbone_fingerprint: str | None = None
                        ) -> DomainReference | None:
        """The reference saved in an adapter folder, None where the folder has none.

        Raises:
            ValueError: besides :meth:`load`'s, a reference measured on another backbone than
                ``backbone_fingerprint`` (the adapter's).
        """
        path = Path(folder) / DOMAIN_REFERENCE_FILE
        if not path.is_file():
            return None
        reference = cls.load(path)
        if None not in (backbone_fingerprint, reference.backbone_fingerprint) and \
                reference.backbone_fingerprint != backbone_fingerprint:
            raise ValueError(f"{path} was measured on another backbone (fingerprint {reference.backbone_fingerprint}) "
                             f"than the adapter's ({backbone_fingerprint}): fit it again with "
                             "recipes/domain_reference.py.")
        return reference
