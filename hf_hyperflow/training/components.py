"""The pieces of a meta-training run, built from its config: the Accelerator of this process, the frozen
backbone, the adapter whose drift network is trained, and AdamW with its learning-rate schedule."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration
from transformers import AutoConfig, AutoModel, TimmWrapperConfig, get_scheduler

from ..adapter import HyperFlowAdapter
from ..config import HyperFlowConfig
from ..pretrained import build_efficientnet_lite0
from .config import TrainConfig

__all__ = ["start_accelerator", "build_backbone", "build_adapter", "build_optimizer"]


def _has_accelerator() -> bool:
    accelerator_api = getattr(torch, "accelerator", None)
    if accelerator_api is not None and hasattr(accelerator_api, "is_available"):
        return bool(accelerator_api.is_available())
    return torch.cuda.is_available()


def start_accelerator(config: TrainConfig, output_dir: Path, cpu: bool | None) -> Accelerator:
    """The Accelerator of this process, checked against how the run was launched; sets torch's CPU threads.

    Raises:
        ValueError: FSDP / DeepSpeed, fp16 on CPU, or batch sizes that do not split over the processes.
        RuntimeError: Accelerate sees fewer processes than were launched (they would train independently).
    """
    run = config.training
    use_cpu = cpu if cpu is not None else (run.cpu if run.cpu is not None else not _has_accelerator())
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=config.losses.unrolled == 0)]
    accelerator = Accelerator(
        cpu=use_cpu, mixed_precision=run.mixed_precision, gradient_accumulation_steps=run.gradient_accumulation_steps,
        log_with=run.report_to, project_config=ProjectConfiguration(project_dir=str(output_dir)),
        kwargs_handlers=handlers)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise ValueError(f"{accelerator.distributed_type.value} is not supported: the trained module is the drift "
                         f"network alone (a few MB) and the frozen backbone is not trained, so there is nothing for it "
                         f"to shard. Launch with DDP (accelerate launch --multi_gpu, or distributed_type: MULTI_GPU).")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(f"{launched} processes were launched but Accelerate sees {accelerator.num_processes}: they "
                           f"would train independently. On CPU launch with `accelerate launch --multi_gpu "
                           f"--num_processes N ...` and training.cpu: true (recipes/train.py: --cpu true).")
    if run.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("training.mixed_precision: fp16 does nothing on CPU; use bf16 (or 'no').")
    world, accumulation = accelerator.num_processes, run.gradient_accumulation_steps
    per_step = run.episodes_per_step
    for name, value in (("training.episodes_per_step", per_step),
                        ("flow.trajectories_per_step", config.flow.trajectories_per_step or per_step)):
        if value % (world * accumulation):
            raise ValueError(f"{name}={value} must be divisible by processes x gradient_accumulation_steps = "
                             f"{world} x {accumulation}.")
    threads = run.threads
    if threads is None and accelerator.device.type == "cpu":
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        threads = max(1, (os.cpu_count() or 1) // max(1, local_processes))
    if threads is not None:
        torch.set_num_threads(threads)
    return accelerator


def build_backbone(config: TrainConfig, output_dir: Path, accelerator: Accelerator) -> tuple[torch.nn.Module, str]:
    """The frozen backbone and where it is stored: ``backbone.path`` (written first with ``backbone.build``),
    or a random one built from ``backbone.random_init`` and saved to ``<output_dir>/backbone``."""
    section = config.backbone
    if section.path is not None:
        if section.build is not None:
            with accelerator.main_process_first():
                if accelerator.is_main_process and not Path(section.path).exists():
                    build_efficientnet_lite0(section.path)
        return AutoModel.from_pretrained(section.path), section.path
    settings = dict(section.random_init)
    model_type = settings.pop("model_type")
    seed = settings.pop("seed", 0)
    if model_type == "timm_wrapper":
        backbone_config = TimmWrapperConfig(**settings)
    else:
        try:
            backbone_config = AutoConfig.for_model(model_type, **settings)
        except (ValueError, KeyError) as error:
            raise ValueError(f"backbone.random_init: cannot build a {model_type!r} config ({error}).") from None
    torch.manual_seed(seed)
    backbone = AutoModel.from_config(backbone_config).eval()
    folder = output_dir / "backbone"
    if accelerator.is_main_process:
        backbone.save_pretrained(folder)
    accelerator.wait_for_everyone()
    return backbone, str(folder)


def build_adapter(config: TrainConfig, backbone: torch.nn.Module) -> HyperFlowAdapter:
    """The adapter to train (``adapter.pretrained`` or a new one from the config's fields), with only the drift
    network requiring gradients."""
    if config.adapter.pretrained is not None:
        adapter = HyperFlowAdapter.from_pretrained(backbone, config.adapter.pretrained)
        adapter.config.inference_mode = False
        adapter.domain_reference = None  # meta-training integrates every task, near its sources or not
    else:
        adapter = HyperFlowAdapter(backbone, HyperFlowConfig(**config.adapter.settings()))
    adapter.backbone.requires_grad_(False)
    adapter.drift.requires_grad_(True)
    # A constant added to every logit changes neither the softmax nor the cross-entropy: the bias's gradient is
    # rounding noise, which Adam would turn into a random walk of one learning rate per step. It stays fixed.
    adapter.drift.logit_bias.requires_grad_(False)
    adapter.model.eval()
    return adapter


def build_optimizer(config: TrainConfig, module: torch.nn.Module, adapter: HyperFlowAdapter):
    """AdamW over ``module``'s trainable parameters and the config's schedule; ``(optimizer, scheduler)``.

    Raises:
        RuntimeError: a parameter of the adapter outside the drift network requires gradients.
    """
    trainable = {id(p) for p in adapter.drift.parameters() if p is not adapter.drift.logit_bias}
    leaked = [n for n, p in adapter.model.named_parameters() if p.requires_grad and id(p) not in trainable]
    if leaked:
        raise RuntimeError(f"Only the drift network may be trained, but {leaked[:3]} require gradients.")
    opt = config.optimizer
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=opt.lr,
                                  betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)
    scheduler = get_scheduler(opt.scheduler, optimizer, num_warmup_steps=opt.warmup_steps,
                              num_training_steps=config.training.max_steps)
    return optimizer, scheduler
