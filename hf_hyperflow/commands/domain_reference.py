"""Fit the domain reference of a trained adapter and save it into the adapter's folder:
:class:`DomainReferenceConfig` and :func:`run_domain_reference`.

    python recipes/domain_reference.py --config TRAINING_CONFIG.yaml --adapter ADAPTER_DIR [--episodes 300]
        [--seed 1] [--gate 2.2]          (or: hf-hyperflow domain-reference with the same options)

A run whose adapter has a ``domain_gate`` fits its reference at the end by itself (``TrainConfig.domain_reference``);
this command is for an adapter trained without one, or to fit it again.

The reference (``domain_reference.safetensors``, :mod:`hf_hyperflow.domain_reference`) holds, per training source
of the config, the centre and spread of the support statistics of its train-class episodes. With ``--gate`` the
adapter's ``domain_gate`` is set too (its config and weights' checksum rewritten); without it the config's own
gate (if any) applies.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..parsing import option

__all__ = ["DomainReferenceConfig", "run_domain_reference", "describe"]


@dataclass
class DomainReferenceConfig:
    """Fit the domain reference of a trained adapter into its folder (and, with ``gate``, set its domain_gate)."""

    config: str = option("The training config (YAML) the adapter was meta-trained with: its sources and splits.")
    adapter: str = option("The adapter folder (HyperFlowAdapter.save_pretrained); the reference is written into it.")
    episodes: int = option("Train-class episodes per source.", 300)
    seed: int = option("Seed of the episodes.", 1)
    gate: float | None = option("Set the adapter's domain_gate to this distance (None: keep the config's).")

    def __post_init__(self):
        for name in ("config", "adapter"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required.")
        if self.episodes < 2:
            raise ValueError(f"--episodes must be >= 2 (a spread needs two episodes), got {self.episodes}.")
        if self.gate is not None and not self.gate > 0:
            raise ValueError(f"--gate must be > 0, got {self.gate}.")


def run_domain_reference(settings: DomainReferenceConfig):
    """Fit, save into the adapter folder, and return the reference (``DomainReference``)."""
    from transformers import AutoModel

    from ..adapter import HyperFlowAdapter
    from ..domain_reference import DOMAIN_REFERENCE_FILE
    from ..training.config import load_config
    from ..training.reference import fit_domain_reference

    config = load_config(settings.config)
    folder = Path(settings.adapter)
    # a run on a randomly initialised backbone wrote it into the run folder
    backbone = AutoModel.from_pretrained(config.backbone.path or Path(config.output_dir) / "backbone").eval()
    adapter = HyperFlowAdapter.from_pretrained(backbone, folder)
    adapter.domain_reference = fit_domain_reference(adapter, config, settings.episodes, settings.seed)
    if settings.gate is None:
        adapter.domain_reference.save(folder / DOMAIN_REFERENCE_FILE)
        return adapter.domain_reference
    adapter.config.domain_gate = float(settings.gate)
    with tempfile.TemporaryDirectory() as saved:  # config, weights (their checksum of the config) and reference
        adapter.save_pretrained(saved)
        for name in ("adapter_config.json", "adapter_model.safetensors", DOMAIN_REFERENCE_FILE):
            shutil.copyfile(Path(saved) / name, folder / name)
    return adapter.domain_reference


def describe(reference, folder) -> str:
    """One line saying what was written where."""
    return (f"Wrote the domain reference of {len(reference.sources)} sources ({', '.join(reference.sources)}; "
            f"{reference.episodes} episodes each) into {folder}")
