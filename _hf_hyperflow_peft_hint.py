"""Makes PEFT say "import hf_hyperflow" when it meets a HyperFlow adapter before the package is imported.

A ``.pth`` file installed with hf-hyperflow imports this module at interpreter start. It is tiny and
imports nothing heavy: it only watches for ``peft.mapping`` and, once that module has run, gives its
(still empty) ``PEFT_TYPE_TO_CONFIG_MAPPING`` a ``__missing__`` that turns the bare ``KeyError:
'HYPERFLOW'`` into an error saying what to do. Registration by ``import hf_hyperflow`` is unaffected.
"""

import importlib.abc
import importlib.machinery
import sys

PEFT_TYPE = "HYPERFLOW"


class UnregisteredPeftTypeError(KeyError):
    """A KeyError (what PEFT's callers expect) whose message says which package provides the type."""

    def __str__(self) -> str:
        return str(self.args[0])


class _HintingMapping(dict):
    def __missing__(self, key):
        if str(getattr(key, "value", key)).upper() == PEFT_TYPE:
            raise UnregisteredPeftTypeError(
                "This adapter's peft_type is 'HYPERFLOW', which the hf-hyperflow package provides: run "
                "`import hf_hyperflow` before loading it with PEFT (pip install hf-hyperflow if it is missing)."
            )
        raise KeyError(key)


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        mapping = getattr(module, "PEFT_TYPE_TO_CONFIG_MAPPING", None)
        if type(mapping) is dict:
            module.PEFT_TYPE_TO_CONFIG_MAPPING = _HintingMapping(mapping)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "peft.mapping":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
