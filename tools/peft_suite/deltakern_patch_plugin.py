"""pytest plugin: every PEFT LoRA layer that a test creates goes through ``deltakern.patch``.

Load it with ``-p deltakern_patch_plugin`` (this folder on ``PYTHONPATH``) to run PEFT's own tests
against deltakern's patched LoRA layers. In ``pytest_configure`` it wraps PEFT's
``BaseTuner.inject_adapter``, the one method through which every adapter's layers are created:
``get_peft_model``, ``PeftModel.from_pretrained``, ``add_adapter``, ``load_adapter`` and
``inject_adapter_in_model`` all call it. After it returns, the model it injected into goes through
``deltakern.patch`` when it holds a PEFT ``LoraLayer`` (other PEFT methods are left as they are),
so the layers a later ``add_adapter`` creates are patched too (patching a patched layer again is a
no-op). It also counts the calls of deltakern's ops made by patched layers (wrapping the names
``peft_patch`` calls them by). The originals are put back in ``pytest_unconfigure``. The terminal
summary gives the injections patched, the distinct layers patched or left on PEFT's path (with
the reasons), and the op calls, so a run that patched or fused nothing cannot pass for a patched run.
"""

from __future__ import annotations

import collections
import functools
import re
import weakref

from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTuner

from deltakern.patch import peft_patch
from deltakern.patch.peft_patch import patch

_OPS = ("lora_linear", "qlora_linear", "dora_linear", "segmented_lora_linear")
_originals: list[tuple[object, str, object]] = []
_op_calls: collections.Counter = collections.Counter()
_skip_reasons: collections.Counter = collections.Counter()
_counts = {"injections": 0}
_patched_layers: weakref.WeakSet = weakref.WeakSet()
_skipped_layers: weakref.WeakSet = weakref.WeakSet()
_layer_total = {"patched layers": 0, "skipped layers": 0}


def _patch(model) -> None:
    """``deltakern.patch(model)`` when it has LoRA layers; counts each layer once."""
    if not any(isinstance(module, LoraLayer) for module in model.modules()):
        return
    report = patch(model)
    _counts["injections"] += 1
    root = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    modules = dict(root.named_modules())
    for name in report.patched:
        if modules[name] not in _patched_layers:
            _patched_layers.add(modules[name])
            _layer_total["patched layers"] += 1
    for name, reason in report.skipped:
        if modules[name] not in _skipped_layers:
            _skipped_layers.add(modules[name])
            _layer_total["skipped layers"] += 1
            _skip_reasons[re.sub(r"'[^']*'", "'...'", reason)] += 1


def _counting(name: str, op):
    @functools.wraps(op)
    def counted(*args, **kwargs):
        _op_calls[name] += 1
        return op(*args, **kwargs)

    return counted


def _replace(owner: object, name: str, replacement: object) -> None:
    _originals.append((owner, name, getattr(owner, name)))
    setattr(owner, name, replacement)


def pytest_configure(config) -> None:
    original = BaseTuner.__dict__["inject_adapter"]

    @functools.wraps(original)
    def inject_adapter(self, model, *args, **kwargs):
        result = original(self, model, *args, **kwargs)
        _patch(model)
        return result

    _replace(BaseTuner, "inject_adapter", inject_adapter)
    for name in _OPS:
        _replace(peft_patch, name, _counting(name, getattr(peft_patch, name)))


def pytest_unconfigure(config) -> None:
    while _originals:
        owner, name, original = _originals.pop()
        setattr(owner, name, original)


def pytest_terminal_summary(terminalreporter) -> None:
    counts = {**_counts, **_layer_total}
    write = terminalreporter.write_line
    write("deltakern.patch: " + ", ".join(f"{n} {what}" for what, n in counts.items()))
    write("deltakern.patch op calls: " + ", ".join(f"{name} {_op_calls[name]}" for name in _OPS))
    for reason, n in _skip_reasons.most_common():
        write(f"deltakern.patch skipped {n}: {reason}")
