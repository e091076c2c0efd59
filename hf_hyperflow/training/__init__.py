"""Meta-training of the drift network with Accelerate: flow matching, unrolled query loss, or a mix.

One concept a module:

- :mod:`.config`: :class:`TrainConfig` (YAML sections and dotted overrides through draccus, checked before any
  work);
- :mod:`.data`: datasets and class splits, episode samplers, which episodes each rank uses at each step;
- :mod:`.losses`: the flow-matching loss, the unrolled forward pass and loss, :class:`DriftObjective`;
- :mod:`.trajectory_pool`: the fine-tuning trajectories of the flow loss (recorded first, or named stores);
- :mod:`.validation`: validation accuracy of fixed episodes, rank-sharded;
- :mod:`.checkpoint`: resumable checkpoints and the run's files;
- :mod:`.components`: the Accelerator, backbone, adapter and optimizer of a run;
- :mod:`.loop`: :func:`train`.

Frozen prefix: with ``first_adapted_block`` set, the blocks before the first adapted one never change, so
their output for an image is computed once and kept per dataset row (:class:`~hf_hyperflow.prefix.PrefixCache`);
a training step then costs the adapted suffix only.

Entry point: :func:`train` (``recipes/train.py`` is its command line).
"""

from .checkpoint import drift_fingerprint
from .config import (
    AdapterSection,
    BackboneSection,
    DatasetSection,
    EpisodeShape,
    EpisodesSection,
    FlowSection,
    GenerateSection,
    LossesSection,
    OptimizerSection,
    RunSection,
    TrainConfig,
    UnrolledSection,
    ValidationSection,
    config_from_dict,
    load_config,
)
from .data import EpisodeMix, step_episode_ids, step_sample_ids
from .loop import TrainResult, train
from .losses import (
    DriftObjective,
    FlowInputs,
    UnrolledInputs,
    episode_logits,
    flow_inputs,
    flow_matching_loss,
    velocity_scales,
)

__all__ = [
    "TrainConfig", "BackboneSection", "AdapterSection", "DatasetSection", "EpisodesSection", "LossesSection",
    "UnrolledSection", "FlowSection", "GenerateSection", "ValidationSection", "OptimizerSection", "RunSection",
    "EpisodeShape", "TrainResult", "DriftObjective", "UnrolledInputs", "FlowInputs", "EpisodeMix", "load_config",
    "config_from_dict", "flow_matching_loss", "flow_inputs",
    "velocity_scales", "episode_logits", "step_episode_ids", "step_sample_ids", "train", "drift_fingerprint",
]
