"""HyperFlowConfig: the PEFT config of a HyperFlow adapter."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import PeftType

__all__ = ["HyperFlowConfig", "HYPERFLOW_PEFT_TYPE", "ADAPTED_GROUPS", "INTEGRATOR_NAMES", "STOPPING_RULES"]

ADAPTED_GROUPS = ("lora", "shift", "head")
INTEGRATOR_NAMES = ("euler", "midpoint", "heun", "rk4")
STOPPING_RULES = ("fixed", "auto")


def _hyperflow_peft_type() -> PeftType:
    """The ``PeftType.HYPERFLOW`` member, added to PEFT's closed enum once per process."""
    if "HYPERFLOW" not in PeftType.__members__:
        member = str.__new__(PeftType, "HYPERFLOW")
        member._name_ = "HYPERFLOW"
        member._value_ = "HYPERFLOW"
        member.__objclass__ = PeftType
        member.__init__("HYPERFLOW")
        PeftType._member_map_["HYPERFLOW"] = member
        PeftType._value2member_map_["HYPERFLOW"] = member
        PeftType._member_names_.append("HYPERFLOW")
        type.__setattr__(PeftType, "HYPERFLOW", member)
    return PeftType.HYPERFLOW


HYPERFLOW_PEFT_TYPE = _hyperflow_peft_type()


@dataclass
class HyperFlowConfig(PeftConfig):
    """Configuration of a HyperFlow adapter: what is adapted, how the drift is integrated, drift-net sizes.

    The adapted state theta is any mix of three groups: ``lora`` (LoRA factors A [r, in], B [out, r] of
    the target Linear / Conv2d modules), ``shift`` (shifts of the biases of target Linear / Conv2d modules
    and of the affine weight and bias of target norm layers) and ``head`` (a per-class shift of the
    prototypes of the cosine classifier). theta_0 is what fine-tuning starts from: B = 0, shifts 0.
    """

    groups: list[str] = field(
        default_factory=lambda: ["lora", "shift", "head"],
        metadata={"help": f"Adapted-state groups, any non-empty mix of {list(ADAPTED_GROUPS)}."},
    )
    r: int = field(default=4, metadata={"help": "LoRA rank of the lora group."})
    lora_alpha: float = field(default=8.0, metadata={"help": "LoRA alpha: the update is (alpha / r) * B @ A."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules that get LoRA factors: a regex over full module names, or a list of name suffixes. "
            "None: the per-model_type default of hf_hyperflow.backbones.BACKBONE_TABLE."
        },
    )
    shift_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules whose bias (Linear / Conv2d) or affine (LayerNorm, BatchNorm2d, GroupNorm) is "
            "shifted: a regex or a list of name suffixes. None: the per-model_type default."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules never adapted: a regex or a list of name suffixes."}
    )
    first_adapted_block: int | None = field(
        default=None,
        metadata={
            "help": "Adapt only blocks from this one on (negative: counted from the end, -2 = last two blocks), "
            "so that the frozen prefix can run once without autograd. None: all blocks."
        },
    )
    integrator: str = field(
        default="euler", metadata={"help": f"ODE integrator used by adapt(), one of {list(INTEGRATOR_NAMES)}."}
    )
    steps: int = field(default=10, metadata={"help": "Number of integration steps from t=0 to t=1."})
    stopping: str = field(
        default="fixed",
        metadata={"help": "How far adapt() integrates: 'fixed' (to t=1) or 'auto' (per task, the point of the path "
                          "whose support set classifies itself best, leave-one-out; t=0 is direct transfer)."},
    )
    stopping_points: int = field(
        default=3, metadata={"help": "Candidate points of the path for stopping='auto', evenly spaced from t=0 to t=1."}
    )
    hidden_size: int = field(default=128, metadata={"help": "Width of the drift network's shared trunk."})
    time_embedding_size: int = field(default=16, metadata={"help": "Size of the sinusoidal embedding of t."})
    module_embedding_size: int = field(default=16, metadata={"help": "Size of the learned per-module embedding."})
    output_rank: int = field(
        default=16,
        metadata={"help": "Size R of the drift trunk's output; each module maps it to its drift with its own [numel, R]."},
    )
    state_projection_size: int = field(
        default=16, metadata={"help": "Size of the projection of a module's current state fed to the drift."}
    )
    statistics_size: int = field(
        default=0,
        metadata={"help": "Size of each module's projection of its input statistics over the support set (per "
                          "channel mean, log variance and spread of the class means), fed to the drift network; 0: "
                          "the drift sees the task through the final features only."},
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Side of the input images; None: taken from the image processor / config."}
    )
    init_seed: int = field(default=0, metadata={"help": "Seed of the random LoRA A factors of theta_0."})
    # Filled in when the adapter is created on a backbone, and checked when it is loaded onto one.
    backbone_model_type: str | None = field(
        default=None, metadata={"help": "model_type of the backbone the adapter was made for (set automatically)."}
    )
    feature_size: int | None = field(
        default=None, metadata={"help": "Size of the backbone's pooled features (set automatically)."}
    )
    adapted_modules: dict[str, list[str]] | None = field(
        default=None,
        metadata={
            "help": "Module name -> adapted roles ('lora', 'shift'), resolved from the patterns when the adapter is "
            "created (set automatically) and used as they are when it is loaded."
        },
    )
    backbone_fingerprint: str | None = field(
        default=None,
        metadata={"help": "Content hash of the backbone's weights at creation (set automatically)."},
    )
    # Fields PEFT reads on every config.
    target_parameters: list[str] | None = field(default=None, metadata={"help": "Unused by HyperFlow."})
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Unused by HyperFlow (see first_adapted_block)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Unused by HyperFlow (see first_adapted_block)."}
    )
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Unused by HyperFlow."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = HYPERFLOW_PEFT_TYPE
        self.groups = list(self.groups) if not isinstance(self.groups, str) else [self.groups]
        unknown = [g for g in self.groups if g not in ADAPTED_GROUPS]
        if not self.groups or unknown:
            raise ValueError(
                f"groups={self.groups!r} is not valid: pass a non-empty list drawn from {list(ADAPTED_GROUPS)}."
            )
        if len(set(self.groups)) != len(self.groups):
            raise ValueError(f"groups={self.groups!r} lists a group twice.")
        if self.stopping not in STOPPING_RULES:
            raise ValueError(f"stopping={self.stopping!r} is unknown: use one of {list(STOPPING_RULES)}.")
        if not isinstance(self.stopping_points, int) or isinstance(self.stopping_points, bool) or self.stopping_points < 2:
            raise ValueError(f"stopping_points={self.stopping_points!r} must be an integer >= 2 (t=0 and t=1 at least).")
        if self.integrator not in INTEGRATOR_NAMES:
            raise ValueError(f"integrator={self.integrator!r} is unknown: use one of {list(INTEGRATOR_NAMES)}.")
        for name in ("r", "steps", "hidden_size", "time_embedding_size", "module_embedding_size",
                     "state_projection_size", "output_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if not isinstance(self.statistics_size, int) or isinstance(self.statistics_size, bool) or self.statistics_size < 0:
            raise ValueError(f"statistics_size={self.statistics_size!r} must be an integer >= 0.")
        if self.time_embedding_size % 2:
            raise ValueError(f"time_embedding_size={self.time_embedding_size} must be even (sin and cos halves).")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha={self.lora_alpha!r} must be > 0.")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size={self.image_size} is too small: use at least 8 pixels.")
        if isinstance(self.target_modules, (list, set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.shift_modules, (list, set, tuple)):
            self.shift_modules = sorted(self.shift_modules)

    @property
    def scaling(self) -> float:
        """LoRA scaling alpha / r."""
        return self.lora_alpha / self.r

    def to_dict(self):
        data = super().to_dict()
        if isinstance(data.get("peft_type"), enum.Enum):
            data["peft_type"] = data["peft_type"].value
        return data
