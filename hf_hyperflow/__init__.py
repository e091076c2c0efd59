"""hf-hyperflow: gradient-free emulation of few-shot test-time fine-tuning for Hugging Face vision
backbones. Importing the package registers the PEFT method ``"HYPERFLOW"`` and the transformers pipeline
``"few-shot-image-classification"`` (each as soon as PEFT / transformers' pipelines are loaded: importing the
package itself loads neither torch nor PEFT; its classes load on first use)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import _registration

__version__ = "0.1.0"

_EXPORTS = {"HyperFlowConfig": ".config", "HyperFlowModel": ".tuner", "HyperFlowAdapter": ".adapter",
            "AdaptedTask": ".task", "FewShotImageClassificationPipeline": ".pipeline"}

__all__ = ["HyperFlowConfig", "HyperFlowModel", "HyperFlowAdapter", "AdaptedTask", "FewShotImageClassificationPipeline",
           "__version__"]

if TYPE_CHECKING:
    from .adapter import HyperFlowAdapter
    from .config import HyperFlowConfig
    from .pipeline import FewShotImageClassificationPipeline
    from .task import AdaptedTask
    from .tuner import HyperFlowModel


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_hyperflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


_registration.install()
