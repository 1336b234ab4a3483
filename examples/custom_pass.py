"""Write your own pass: fuse a hand-written swish, ``x * sigmoid(x)``, into one SiLU op.

Many models spell SiLU by hand (``x * torch.sigmoid(x)``, ``x.sigmoid() * x``). fxforge's "cpu" target fuses
conv + silu into one oneDNN kernel, but only when the silu is one op. A three-line pass written with
``fxforge.patterns`` closes the gap, and runs by name in pipeline text or slotted into the target's pipeline
with ``extra_passes``.

Run from the repository root once ``make test`` (or ``pip install -e .``) has installed fxforge:
``.venv/bin/python examples/custom_pass.py``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fxforge
from fxforge import patterns as P
from fxforge.testing import randomize_bn

SILU_RULES = [
    # x * sigmoid(x) -> silu(x)     (either operand order; sigmoid as torch.sigmoid, x.sigmoid() or nn.Sigmoid)
    P.Rule(lambda x: x * torch.sigmoid(x), lambda x: F.silu(x)),
]


@fxforge.graph_pass(name="fuse-silu", requires=("eval",))
def fuse_silu(gm, ctx):
    """x * sigmoid(x) -> F.silu(x). Correct because silu(x) is defined as x * sigmoid(x)."""
    return P.rewrite(gm, SILU_RULES, ctx)  # a PassResult: the report lists how often each rule fired


class SwishNet(nn.Module):
    """A small CNN with swish written three ways, as found in the wild."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16)
        self.conv3, self.gate = nn.Conv2d(16, 32, 1), nn.Sigmoid()
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.conv1(x))
        y = y * torch.sigmoid(y)
        z = self.bn2(self.conv2(y))
        z = z.sigmoid() * z
        w = self.conv3(z)
        w = w * self.gate(w)
        return self.head(w.mean((2, 3)))


def conv_post_ops(compiled: fxforge.CompiledModule) -> list[str]:
    """The post-ops of each lowered conv (``OneDnnConv2d``), in graph order."""
    gm = compiled.graph_module
    mods = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    return [m.activation or "none" for m in mods if type(m).__name__ == "OneDnnConv2d"]


def main() -> None:
    torch.manual_seed(0)
    model = randomize_bn(SwishNet()).eval()
    x = torch.randn(4, 3, 32, 32)

    plain = fxforge.compile(model, "cpu", example_inputs=x)
    print(f"cpu pipeline:            {plain.pipeline}")
    print(f"  conv post-ops:         {conv_post_ops(plain)}")

    # 1. By name, in pipeline text.
    text = fxforge.pipeline_for("cpu").replace("fold-bn,", "fold-bn,fuse-silu,")
    by_name = fxforge.compile(model, "cpu", example_inputs=x, pipeline=text)
    # 2. Slotted into the target's pipeline.
    slotted = fxforge.compile(model, "cpu", example_inputs=x, extra_passes={"after:fold-bn": [fuse_silu]})
    assert slotted.pipeline == by_name.pipeline

    record = next(r for r in slotted.report.passes if r.name == "fuse-silu")
    print(f"with fuse-silu:          {slotted.pipeline}")
    for rule, count in record.matches.items():
        print(f"  fuse-silu rule {rule}: {count} match(es)")
    print(f"  conv post-ops:         {conv_post_ops(slotted)}")
    nodes = {name: len(c.graph_module.graph.nodes) for name, c in (("plain", plain), ("fuse-silu", slotted))}
    print(f"  graph nodes:           {nodes['plain']} -> {nodes['fuse-silu']}")
    with torch.inference_mode():
        error = fxforge.numerics.max_errors(slotted(x), model(x))[1]
    print(f"  max relative error vs eager: {error:.2g}")


if __name__ == "__main__":
    main()
