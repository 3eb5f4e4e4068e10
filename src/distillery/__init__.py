"""distillery: distill a large teacher language model into a small student for consumer devices.

The Python API (docs in :mod:`distillery.python_api`, example in the README's "Python API" section)::

    import distillery
    result = distillery.distill("recipe.yaml", train={"max_steps": 50})   # -> RunResult
    distillery.evaluate(result, data=["demo:milton"], max_blocks=8)       # -> metrics dict
    distillery.export(result, "student.gguf")                             # -> export report

Every name is imported on first use (module ``__getattr__``), so ``import distillery`` loads neither
torch nor transformers.
"""

import sys
import types

__version__ = "0.1.0"

from .quiet import quiet_imports as _quiet_imports  # noqa: E402  (logging only: still no torch here)

_quiet_imports()  # torchao / torchvision import-time noise (distillery.quiet)

# public name -> module that defines it (relative to this package)
_API = {
    "distill": "python_api", "evaluate": "python_api", "export": "python_api", "configure": "python_api",
    "RunResult": "python_api", "load_config": "config", "RunConfig": "config",
    "load_teacher": "teachers.hf", "open_teacher": "teachers.open", "DistilleryError": "errors",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module 'distillery' has no attribute '{name}'")


def __dir__():
    return sorted([*globals(), *_API])


class _Package(types.ModuleType):
    """``distillery.evaluate`` and ``distillery.export`` are API functions that share their names with
    submodules. Importing a submodule sets it as an attribute of its package, which would replace the
    function (after ``distillery.distill`` imports ``distillery.evaluate``, ``distillery.evaluate(...)``
    would be a module). The package keeps the function; the submodules stay importable as always
    (``from distillery.evaluate import run_eval``: that form reads ``sys.modules``)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
