"""pytest plugin: stand-ins for PEFT test-suite imports that deltakern's environment lacks.

PEFT's ``tests/testing_common.py`` imports ``diffusers.StableDiffusionPipeline`` (only for
``isinstance`` checks in Stable Diffusion tests) and ``tests/testing_utils.py`` imports
``datasets.load_dataset`` (only for hub datasets, unreachable here). Neither matters to the LoRA
cases of ``test_custom_models.py``; without them the module cannot be imported at all. A stand-in is
registered only when the real package is missing, and using one raises, so no test passes by it.
Loaded in both runs (plain and patched), so the two see the same modules.
"""

from __future__ import annotations

import importlib.util
import sys
import types


class _MissingPipeline:
    """Stands in for ``diffusers.StableDiffusionPipeline``: a class no model is an instance of."""

    def __init__(self, *args, **kwargs):
        raise ImportError("diffusers is not installed (deltakern's PEFT-suite stand-in)")


def _load_dataset(*args, **kwargs):
    raise ImportError("datasets is not installed (deltakern's PEFT-suite stand-in)")


def _stand_in(name: str, **attributes) -> None:
    if importlib.util.find_spec(name) is not None:
        return
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module


_stand_in("diffusers", StableDiffusionPipeline=_MissingPipeline)
_stand_in("datasets", load_dataset=_load_dataset)
