"""HyperFlowConfig: the PEFT config of a HyperFlow adapter."""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import PeftType

__all__ = ["HyperFlowConfig", "HYPERFLOW_PEFT_TYPE", "ADAPTED_GROUPS", "INTEGRATOR_NAMES", "STOPPING_RULES",
           "CONFIG_FILE", "FREE_FIELDS", "saved_fields", "check_saved_fields"]

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
CONFIG_FILE = "adapter_config.json"
# Fields of a saved config free to change after saving: provenance, and the module patterns (a saved adapter
# uses the modules it recorded in adapted_modules). Every other field sets what the saved weights compute.
FREE_FIELDS = ("peft_version", "base_model_name_or_path", "revision", "task_type", "auto_mapping", "inference_mode",
               "target_modules", "shift_modules", "exclude_modules")
# Fields set when an adapter is created on a backbone; a saved adapter must hold them.
FILLED_ON_CREATION = ("backbone_model_type", "feature_size", "adapted_modules", "backbone_fingerprint", "image_size")
# PEFT reads these fields on every config; HyperFlow has its own ways to say what they say.
UNUSED_FIELDS = {
    "target_parameters": "adapt parameters through their modules with target_modules",
    "layers_to_transform": "use first_adapted_block to adapt only the last blocks",
    "layers_pattern": "use first_adapted_block to adapt only the last blocks",
    "modules_to_save": "only the drift network and theta_0 are saved",
}


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
    domain_gate: float | None = field(
        default=None,
        metadata={"help": "Direct transfer (t=0) for a task whose support set lies farther than this from every "
                          "training source (the distance of hf_hyperflow.domain_reference, against the reference "
                          "saved with the adapter; needs statistics_size > 0). None: every task is integrated."},
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
        _check_groups(self)
        _check_choices_and_sizes(self)
        _check_patterns_and_backbone(self)
        for name, instead in UNUSED_FIELDS.items():
            if getattr(self, name) is not None:
                raise ValueError(f"{name}={getattr(self, name)!r}: HyperFlow does not use {name}; {instead}.")
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.shift_modules, (list, tuple)):
            self.shift_modules = sorted(self.shift_modules)

    @classmethod
    def check_kwargs(cls, **kwargs):
        """The fields read from a saved ``adapter_config.json`` (PEFT calls this when loading): every field that
        sets what the adapter computes must be there, and no field this version does not know.

        Raises:
            ValueError: missing or unknown fields, with what to do.
        """
        check_saved_fields(kwargs, CONFIG_FILE)
        return kwargs

    @property
    def scaling(self) -> float:
        """LoRA scaling alpha / r."""
        return self.lora_alpha / self.r

    def to_dict(self):
        data = super().to_dict()
        if isinstance(data.get("peft_type"), enum.Enum):
            data["peft_type"] = data["peft_type"].value
        return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(config: HyperFlowConfig, name: str, low: int, *, optional: bool = False) -> None:
    """``name`` must be an int >= ``low`` (or None with ``optional``): TypeError / ValueError ``"name=value ..."``."""
    value = getattr(config, name)
    if value is None and optional:
        return
    if not _is_int(value):
        raise TypeError(f"{name}={value!r} must be an integer{' or None' if optional else ''}, not "
                        f"{type(value).__name__}.")
    if value < low:
        raise ValueError(f"{name}={value!r} must be {'a positive integer' if low == 1 else f'an integer >= {low}'}.")


def _check_groups(config: HyperFlowConfig) -> None:
    groups = config.groups
    if isinstance(groups, str) or not isinstance(groups, (list, tuple)):
        raise TypeError(f"groups={groups!r} must be a list of group names drawn from {list(ADAPTED_GROUPS)}, e.g. "
                        f"{[groups] if isinstance(groups, str) else ['lora', 'shift', 'head']}.")
    config.groups = list(groups)
    unknown = [g for g in config.groups if g not in ADAPTED_GROUPS]
    if not config.groups or unknown:
        raise ValueError(f"groups={config.groups!r} is not valid: pass a non-empty list drawn from "
                         f"{list(ADAPTED_GROUPS)}.")
    if len(set(config.groups)) != len(config.groups):
        raise ValueError(f"groups={config.groups!r} lists a group twice.")


def _check_domain_gate(config: HyperFlowConfig) -> None:
    gate = config.domain_gate
    if gate is None:
        return
    if isinstance(gate, bool) or not isinstance(gate, (int, float)):
        raise TypeError(f"domain_gate={gate!r} must be a number or None, not {type(gate).__name__}.")
    if not (math.isfinite(gate) and gate > 0):
        raise ValueError(f"domain_gate={gate!r} must be > 0 (and finite), or None for no gate.")
    if not config.statistics_size:
        raise ValueError("domain_gate reads the support's module input statistics, which this config does not "
                         "capture (statistics_size=0): set statistics_size > 0, or domain_gate=None.")


def _check_choices_and_sizes(config: HyperFlowConfig) -> None:
    for name, choices in (("integrator", INTEGRATOR_NAMES), ("stopping", STOPPING_RULES)):
        if getattr(config, name) not in choices:
            raise ValueError(f"{name}={getattr(config, name)!r} is unknown: use one of {list(choices)}.")
    for name in ("r", "steps", "hidden_size", "time_embedding_size", "module_embedding_size", "state_projection_size",
                 "output_rank"):
        _check_int(config, name, 1)
    _check_int(config, "stopping_points", 2)
    _check_int(config, "statistics_size", 0)
    _check_domain_gate(config)
    _check_int(config, "init_seed", 0)
    _check_int(config, "image_size", 8, optional=True)
    _check_int(config, "feature_size", 1, optional=True)
    _check_int(config, "first_adapted_block", -(2**31), optional=True)
    if config.time_embedding_size % 2:
        raise ValueError(f"time_embedding_size={config.time_embedding_size} must be even (sin and cos halves).")
    alpha = config.lora_alpha
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise TypeError(f"lora_alpha={alpha!r} must be a number, not {type(alpha).__name__}.")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"lora_alpha={alpha!r} must be > 0 (and finite).")


def _check_patterns_and_backbone(config: HyperFlowConfig) -> None:
    for name in ("target_modules", "shift_modules", "exclude_modules"):
        value = getattr(config, name)
        if value is None:
            continue
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"{name}={value!r} is not a valid regular expression ({error}).") from None
        elif not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise TypeError(f"{name}={value!r} must be a regex, a list of module name suffixes, or None.")
    for name in ("backbone_model_type", "backbone_fingerprint", "task_type", "base_model_name_or_path", "revision"):
        value = getattr(config, name)
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name}={value!r} must be a string or None.")
    if not isinstance(config.inference_mode, bool):
        raise TypeError(f"inference_mode={config.inference_mode!r} must be true or false.")
    modules = config.adapted_modules
    if modules is None:
        return
    valid = isinstance(modules, dict) and all(
        isinstance(k, str) and isinstance(v, list) and v and set(v) <= {"lora", "shift"} and set(v) <= set(config.groups)
        for k, v in modules.items())
    if not valid:
        raise TypeError(f"adapted_modules must map module names to non-empty lists of the groups 'lora' / 'shift' "
                        f"this config adapts ({config.groups}), got {modules!r:.200}.")


def saved_fields() -> list[str]:
    """The fields a saved ``adapter_config.json`` must hold: every HyperFlow field but the unused PEFT ones."""
    inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    return [f.name for f in dataclasses.fields(HyperFlowConfig) if f.name not in inherited | set(UNUSED_FIELDS)]


def check_saved_fields(data: dict, where: str) -> None:
    """``data`` read from ``where`` (an ``adapter_config.json``) holds every field of :func:`saved_fields` and no
    unknown one.

    Raises:
        ValueError: missing fields (they change what the adapter computes) or unknown ones.
    """
    known = {f.name for f in dataclasses.fields(HyperFlowConfig)}
    missing = [name for name in saved_fields() if name not in data]
    if missing:
        raise ValueError(f"{where} lacks the field(s) {missing}, which set what the adapter computes; loading it with "
                         "defaults would give other results. It was written by an older version or edited: save the "
                         "adapter again with HyperFlowAdapter.save_pretrained, or add the fields.")
    unset = [name for name in FILLED_ON_CREATION if data.get(name) is None]
    if unset:
        raise ValueError(f"{where} has no value for {unset}: they are filled in when an adapter is created on a "
                         "backbone and checked when it is loaded onto one. Save the adapter again from its backbone.")
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where} has field(s) {unknown} this version of hf-hyperflow does not know: it was written "
                         "by a newer version (pip install -U hf-hyperflow) or edited by hand.")
