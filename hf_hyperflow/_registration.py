"""What importing hf_hyperflow registers, done when the registry exists rather than by importing it.

``import hf_hyperflow`` registers the PEFT method ``"HYPERFLOW"`` (PEFT's mappings) and the transformers pipeline
``"few-shot-image-classification"`` (transformers' ``PIPELINE_REGISTRY``). Importing PEFT or transformers' pipelines
takes seconds, so the package does not import them itself: each registration runs as soon as its registry's module
(``peft``, ``transformers.pipelines``) is loaded, whether that happened before ``import hf_hyperflow`` or after it,
and once no module of hf_hyperflow, peft or transformers is half-imported (so that the registration's own imports
never meet a partly initialised module). A command such as ``hf-hyperflow --help`` then starts without torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

__all__ = ["install", "register_ready"]

TRIGGERS = {"peft": "_register_peft", "transformers.pipelines": "_register_pipeline"}
PACKAGES = ("hf_hyperflow.", "peft", "transformers")
_done: set[str] = set()
_running = False


def _register_peft() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    from .config import HYPERFLOW_PEFT_TYPE, HyperFlowConfig
    from .tuner import HyperFlowModel

    if HYPERFLOW_PEFT_TYPE not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name="hyperflow", config_cls=HyperFlowConfig, model_cls=HyperFlowModel,
                             prefix="hyperflow_")


def _register_pipeline() -> None:
    importlib.import_module("hf_hyperflow.pipeline")  # registers the task when it runs


def _half_imported(finished: str | None) -> bool:
    """Whether a module of hf_hyperflow (but the package itself), peft or transformers is still being imported;
    ``finished``: a module that has run and is only waiting for its import to return."""
    for name, module in list(sys.modules.items()):
        if name != finished and name.startswith(PACKAGES) and \
                getattr(getattr(module, "__spec__", None), "_initializing", False):
            return True
    return False


def register_ready(finished: str | None = None) -> None:
    """Run every registration whose registry module is loaded and that has not run yet (when it is safe: see
    :func:`_half_imported`); a registration that loads another registry's module runs that one too."""
    global _running
    if _running:
        return
    _running = True
    try:
        while True:
            pending = [trigger for trigger in TRIGGERS if trigger not in _done and trigger in sys.modules]
            if not pending or _half_imported(finished):
                return
            _done.add(pending[0])
            globals()[TRIGGERS[pending[0]]]()
    finally:
        _running = False


class _Loader(importlib.abc.Loader):
    """The module's own loader, and :func:`register_ready` after the module has run."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # get_source, get_resource_reader... as the wrapped loader has them
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        register_ready(module.__name__)


class _Finder(importlib.abc.MetaPathFinder):
    """Watches the registries' modules and hf_hyperflow's own (after which a deferred registration can run)."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in TRIGGERS and not fullname.startswith("hf_hyperflow."):
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, _Finder) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Watch for the registries' modules (once per interpreter) and register into those already loaded."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    register_ready()
