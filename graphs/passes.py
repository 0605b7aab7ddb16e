"""Graph passes: the base class every rewrite of an exported graph derives from, and the runner.

A pass is a small class ``<Verb><Object>Pass`` built from its targets; calling it on a model::

    result = pass_(model)      # call(model) -> PassResult(model, modified, count); then ensures(model)

- ``call`` rewrites the model (in place; the result holds it) and counts what it rewrote (weights
  stored, subgraphs inserted, kernels written), so tests and reports can state exact counts. Input it
  cannot rewrite is refused in ``call`` with a ValueError naming the module and the reason.
- ``ensures`` states the pass's postcondition on the rewritten model ("every target's weight is read
  through a DequantizeLinear of its code type"): it returns why the postcondition does not hold, or None.
  A failed postcondition is a bug of the pass, never bad input: :class:`RuntimeError` naming the pass.

:class:`PassSequence` runs passes in order, each one's postcondition checked right after it runs (a later
pass may rewrite what an earlier one ensured: the lowering to ORT kernels consumes the weight
DequantizeLinear nodes), and returns every result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable

import onnx


@dataclass(frozen=True)
class PassResult:
    model: onnx.ModelProto
    modified: bool
    count: int  # what the pass rewrote: weights, subgraphs or kernels (each pass's docstring says which)


class GraphPass(ABC):
    """One rewrite of a model: :meth:`call` does it, :meth:`ensures` checks its postcondition."""

    @property
    def name(self) -> str:
        return type(self).__name__

    @abstractmethod
    def call(self, model: onnx.ModelProto) -> PassResult:
        """Rewrite ``model`` in place; ValueError for a graph the pass cannot rewrite."""

    @abstractmethod
    def ensures(self, model: onnx.ModelProto) -> str | None:
        """Why ``model``, as :meth:`call` left it, does not hold this pass's postcondition; None when it does."""

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        result = self.call(model)
        reason = self.ensures(result.model)
        if reason:
            raise RuntimeError(f"{self.name}: postcondition failed: {reason}")
        return result


@dataclass(frozen=True)
class SequenceResult:
    """The model after every pass of a :class:`PassSequence`, and each pass with its result, in order."""

    model: onnx.ModelProto
    results: tuple[tuple[GraphPass, PassResult], ...]

    def count(self, kind: type[GraphPass]) -> int:
        """The rewrites counted by the passes of type ``kind`` (0 when the sequence has none)."""
        return sum(r.count for p, r in self.results if isinstance(p, kind))


class PassSequence:
    """Passes run in order on one model, each followed by its postcondition check."""

    def __init__(self, passes: Iterable[GraphPass]):
        self.passes = tuple(passes)

    def __call__(self, model: onnx.ModelProto) -> SequenceResult:
        results = []
        for p in self.passes:
            result = p(model)
            model = result.model
            results.append((p, result))
        return SequenceResult(model, tuple(results))


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it."""
    return {o: n for n in graph.node for o in n.output}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out
