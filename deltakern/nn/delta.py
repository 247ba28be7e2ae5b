"""``DeltaModule``: the base class of every module that holds a delta (the trained parameters of a
delta-tuning method), so that model surgery tells delta from base without naming the methods."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn


class DeltaModule(nn.Module):
    """A module whose :meth:`delta_parameters` are the delta; in a patched model every other
    parameter is the frozen base. By default all of the module's parameters are the delta; a module
    that wraps a base layer returns only its own."""

    def delta_parameters(self) -> Iterator[nn.Parameter]:
        return self.parameters()
