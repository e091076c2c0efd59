"""The HyperFlow PEFT tuner: per-task delta layers and the BaseTuner that injects them."""

from .layer import HyperFlowConv2d, HyperFlowLayer, HyperFlowLinear, HyperFlowNorm
from .model import HyperFlowModel

__all__ = ["HyperFlowModel", "HyperFlowLayer", "HyperFlowLinear", "HyperFlowConv2d", "HyperFlowNorm"]
