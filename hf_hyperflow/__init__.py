"""hf-hyperflow: gradient-free emulation of few-shot test-time fine-tuning for Hugging Face vision
backbones. Importing the package registers the PEFT method ``"HYPERFLOW"`` and the transformers pipeline
``"few-shot-image-classification"``."""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import register_peft_method

from .config import HYPERFLOW_PEFT_TYPE, HyperFlowConfig
from .tuner import HyperFlowModel

if HYPERFLOW_PEFT_TYPE not in PEFT_TYPE_TO_CONFIG_MAPPING:
    register_peft_method(name="hyperflow", config_cls=HyperFlowConfig, model_cls=HyperFlowModel, prefix="hyperflow_")

from .adapter import AdaptedTask, HyperFlowAdapter  # noqa: E402
from .pipeline import FewShotImageClassificationPipeline  # noqa: E402  (registers the pipeline task)

__version__ = "0.1.0"

__all__ = ["HyperFlowConfig", "HyperFlowModel", "HyperFlowAdapter", "AdaptedTask", "FewShotImageClassificationPipeline",
           "__version__"]
