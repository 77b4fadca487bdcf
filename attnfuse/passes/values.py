"""The values a graph's nodes take on the example inputs, for choices that measure.

``policy="fast"`` admits a quantized kernel at a site only if its output on the site's own
activations (the example inputs run through the model) stays close to the exact output; this
module runs the captured graph once, eagerly and without gradients, keeping only the values of
the nodes asked for.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch.fx import GraphModule, Interpreter, Node


class _Recorder(Interpreter):
    def __init__(self, gm: GraphModule, wanted: set[Node]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: Node) -> Any:
        out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out
        return out


def capture(gm: GraphModule, example_inputs: Sequence[Any], nodes: Iterable[Node]) -> dict[Node, Any]:
    """``{node: value}`` for ``nodes`` of ``gm`` run on ``example_inputs`` (real tensors)."""
    wanted = set(nodes)
    if not wanted:
        return {}
    recorder = _Recorder(gm, wanted)
    with torch.no_grad():
        recorder.run(*example_inputs)
    return recorder.values
