"""attention-to-sdpa: attention written out by hand, and nn.MultiheadAttention, onto
``F.scaled_dot_product_attention`` (torch's fused attention kernels: flash / memory-efficient / oneDNN).

Rewrites:
    softmax((q @ k.transpose(-2, -1)) / c, dim=-1) @ v   ->  sdpa(q, k, v, scale=1/c)
    softmax((q @ k.transpose(-2, -1)) * c, dim=-1) @ v   ->  sdpa(q, k, v, scale=c)
    softmax(q @ k.transpose(-2, -1), dim=-1) @ v         ->  sdpa(q, k, v, scale=1.0)
    softmax(<any of these scores> + mask, dim=-1) @ v   ->  sdpa(q, k, v, attn_mask=mask, scale=...)
      (mask a floating-point tensor: transformers' eager attention, exported or traced)
  (``@``, ``torch.matmul`` or ``torch.bmm``; ``k.transpose(-1, -2)``, ``torch.transpose`` or ``k.mT``;
  ``F.softmax``, ``torch.softmax`` or ``Tensor.softmax`` over the last dimension; ``c`` a number; any of
  these as the aten ops torch.export records), and
    mha(x, x, x, need_weights=False)[0]  ->  SdpaSelfAttention(mha)(x)   (batch_first, no masks, no bias_k/v)
Why correct: sdpa computes softmax(q k^T * scale + attn_mask) v, the same expression, with the attention matrix kept
inside one kernel; SdpaSelfAttention applies MultiheadAttention's own in-projection, head split, attention
and out-projection (dropout is inactive in eval). Outputs agree to float rounding (checked in the tests).
Preconditions: eval mode (dropout between softmax and ``@ v`` already removed by remove-noops); the
intermediate scores and probabilities are read only by the pattern (otherwise it is left alone).
"""

from __future__ import annotations

import operator
from numbers import Number

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxforge.graph.matching import module_of, replace_submodule
from fxforge.graph.meta import record_rewrite, tensor_info, tensor_shape
from fxforge.graph.ops import op_name
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import graph_pass

_MATMULS = {"matmul", "bmm"}  # a @ b on the last two dims (bmm: of 3-D tensors)


def _is_call(node: object, ops: set[str]) -> bool:
    """A function or method call of one of ``ops`` (op-table names)."""
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and op_name(node) in ops


def _sole_reader(node: fx.Node, reader: fx.Node) -> bool:
    return list(node.users) == [reader]


def _transposed_key(node: object) -> fx.Node | None:
    """k for k.transpose(-2, -1) / torch.transpose(k, -1, -2) / k.mT, else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return node.args[0]
    if not _is_call(node, {"transpose"}) or node.kwargs or len(node.args) != 3:
        return None
    rank = len(tensor_shape(node) or ())
    dims = {d % rank if rank else d for d in node.args[1:]}
    return node.args[0] if rank and dims == {rank - 2, rank - 1} else None


def _last_dim_softmax(node: fx.Node) -> fx.Node | None:
    """The scores a softmax over the last dimension reads, else None."""
    # F.softmax traces with its defaults spelled out (_stacklevel, dtype=None)
    if not _is_call(node, {"softmax"}) or set(node.kwargs) - {"dim", "_stacklevel", "dtype"} \
            or node.kwargs.get("dtype") is not None or len(node.args) > 2:
        return None
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    rank = len(tensor_shape(node) or ())
    return node.args[0] if isinstance(dim, int) and rank and dim % rank == rank - 1 else None


def _scaled_scores(scores: fx.Node) -> tuple[fx.Node, float] | None:
    """(q @ k^T node, scale) for scores = q @ k^T, (q @ k^T) / c or (q @ k^T) * c."""
    scaling = op_name(scores) if scores.op in ("call_function", "call_method") else None
    if scaling in ("div", "mul") and len(scores.args) == 2 and not scores.kwargs:
        a, b = scores.args
        if scaling == "mul" and isinstance(a, Number):
            a, b = b, a
        if isinstance(a, fx.Node) and isinstance(b, Number) and not isinstance(b, bool) and b != 0 \
                and _sole_reader(a, scores):
            return a, (1.0 / b if scaling == "div" else float(b))
        return None
    return scores, 1.0


def _masked_scores(scores: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """(the scaled scores, the additive float mask) for scores = s + mask (the mask's dtype is floating: a
    bool mask added would count as 0/1, which sdpa reads differently), else (scores, None)."""
    if not _is_call(scores, {"add"}) or len(scores.args) != 2 or scores.kwargs:
        return scores, None
    for s, mask in (scores.args, scores.args[::-1]):
        info = tensor_info(mask) if isinstance(mask, fx.Node) else None
        if isinstance(s, fx.Node) and _sole_reader(s, scores) and info is not None \
                and getattr(info, "dtype", torch.bool).is_floating_point and _is_call(s, _MATMULS | {"mul", "div"}):
            return s, mask
    return scores, None


def _rewrite_explicit(gm: fx.GraphModule, out: fx.Node) -> bool:
    if not _is_call(out, _MATMULS) or len(out.args) != 2 or out.kwargs:
        return False
    probs, v = out.args
    if not isinstance(probs, fx.Node) or not _sole_reader(probs, out):
        return False
    scores = _last_dim_softmax(probs)
    if not isinstance(scores, fx.Node) or not _sole_reader(scores, probs):
        return False
    unmasked, mask = _masked_scores(scores)
    scaled = _scaled_scores(unmasked)
    if scaled is None:
        return False
    qk, scale = scaled
    if not _is_call(qk, _MATMULS) or len(qk.args) != 2 or qk.kwargs:
        return False
    q, key_t = qk.args
    k = _transposed_key(key_t)
    if k is None or not isinstance(q, fx.Node) or not isinstance(v, fx.Node):
        return False
    shapes = [tensor_shape(t) for t in (q, k, v)]
    if any(s is None or len(s) < 3 for s in shapes):  # sdpa wants (..., L, E) with a batch dimension
        return False
    kwargs = {"scale": scale} if mask is None else {"attn_mask": mask, "scale": scale}
    with gm.graph.inserting_before(out):
        sdpa = gm.graph.call_function(F.scaled_dot_product_attention, (q, k, v), kwargs)
    record_rewrite(sdpa, "attention-to-sdpa", *(n for n in (key_t, qk, unmasked, scores, probs, out) if n is not None))
    out.replace_all_uses_with(sdpa)
    for node in dict.fromkeys((out, probs, scores, unmasked, qk, key_t)):
        if not node.users:
            gm.graph.erase_node(node)
    return True


class SdpaSelfAttention(nn.Module):
    """nn.MultiheadAttention (batch_first, self-attention, no masks) as in-projection, sdpa, out-projection."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim
        self.in_proj_weight = nn.Parameter(mha.in_proj_weight.detach().clone(), requires_grad=False)
        bias = mha.in_proj_bias
        self.in_proj_bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.out_proj = nn.Linear(mha.embed_dim, mha.embed_dim, bias=mha.out_proj.bias is not None)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, embed = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, embed))


def _plain_self_attention(gm: fx.GraphModule, node: fx.Node) -> nn.MultiheadAttention | None:
    mha = module_of(gm, node)
    if not isinstance(mha, nn.MultiheadAttention) or not mha.batch_first or not mha._qkv_same_embed_dim \
            or mha.bias_k is not None or mha.add_zero_attn:
        return None
    args = list(node.args) + [node.kwargs.get(k) for k in ("query", "key", "value") if k in node.kwargs]
    if len(args) != 3 or not (args[0] is args[1] is args[2]) or not isinstance(args[0], fx.Node):
        return None
    allowed = {"query", "key", "value", "need_weights", "key_padding_mask", "attn_mask"}
    if set(node.kwargs) - allowed or node.kwargs.get("need_weights", True) is not False \
            or node.kwargs.get("key_padding_mask") is not None or node.kwargs.get("attn_mask") is not None:
        return None
    shape = tensor_shape(args[0])
    if shape is None or len(shape) != 3:
        return None
    # the output tuple is only unpacked: (out, None)[0]
    if not node.users or not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0
                                 for u in node.users):
        return None
    return mha


def _rewrite_mha(gm: fx.GraphModule, node: fx.Node) -> bool:
    mha = _plain_self_attention(gm, node)
    if mha is None:
        return False
    replace_submodule(gm, str(node.target), SdpaSelfAttention(mha))
    x = node.args[0] if node.args else node.kwargs["query"]
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(str(node.target), (x,))
    record_rewrite(new, "attention-to-sdpa", node)
    for user in list(node.users):
        record_rewrite(new, "attention-to-sdpa", node, user)
        user.replace_all_uses_with(new)
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    return True


@graph_pass(name="attention-to-sdpa", requires=("eval",))
def attention_to_sdpa(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """softmax(q k^T * c) v and plain self-attention MultiheadAttention -> F.scaled_dot_product_attention."""
    rewritten = 0
    for node in list(gm.graph.nodes):
        if getattr(node, "_erased", False):  # removed by an earlier rewrite
            continue
        rewritten += _rewrite_explicit(gm, node) or _rewrite_mha(gm, node)
    return rewritten > 0
