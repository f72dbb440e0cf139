"""Op rules: how channel axes flow through each aten op.

One small function per op (or family of ops), registered by its aten name. A rule reads the axes
of its inputs from the `RuleContext`, couples what the op couples (`ctx.unify`), tags what the
classification needs to know (a reduced axis, an embedding, a contraction between activations),
and returns the axes of its output: one entry per dimension, an `Expr` for a channel dimension or
None for a dimension that carries no channels (batch, sequence, constants).

An op with no rule is only an error when one of its inputs carries a channel axis: mask and
position arithmetic on untracked tensors needs no rule at all.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .axes import Expr

if TYPE_CHECKING:
    from .analysis import RuleContext

Axes = tuple[Expr | None, ...]
Rule = Callable[["RuleContext"], Any]

OP_RULES: dict[str, Rule] = {}


def _registrar(table: dict[str, Callable]) -> Callable[..., Callable[[Callable], Callable]]:
    def register(*names: str) -> Callable[[Callable], Callable]:
        def decorate(rule: Callable) -> Callable:
            for name in names:
                table[name] = rule
            return rule

        return decorate

    return register


def _lookup(table: dict[str, Callable], target: Any) -> Callable | None:
    """By aten name: the exact overload ('aten.add.Tensor') first, then every overload ('aten.add')."""
    if target is operator.getitem:
        return table.get("getitem")
    name = str(target)
    if name in table:
        return table[name]
    packet = getattr(target, "overloadpacket", None)
    return table.get(str(packet)) if packet is not None else None


register = _registrar(OP_RULES)
"""Register a propagation rule under aten names: 'aten.add' (every overload) or 'aten.add.Tensor'."""


def rule_for(target: Any) -> Rule | None:
    return _lookup(OP_RULES, target)


def _dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


# --- pointwise ----------------------------------------------------------------------------------
ELEMENTWISE = """
add sub rsub mul div true_divide pow rsqrt sqrt exp exp2 expm1 log log1p log2 neg abs sign reciprocal
silu relu relu6 gelu sigmoid tanh softplus mish hardtanh hardswish hardsigmoid elu leaky_relu erf
sin cos square clamp clamp_min clamp_max where masked_fill maximum minimum fmod remainder lerp
addcmul addcdiv nan_to_num floor ceil round trunc eq ne lt le gt ge logical_not logical_and
logical_or logical_xor bitwise_not bitwise_and bitwise_or __and__ __or__ isnan isinf
to _to_copy type_as contiguous clone alias detach dropout lift_fresh_copy copy
""".split()


@register(*(f"aten.{name}" for name in ELEMENTWISE))
def elementwise(ctx: RuleContext) -> Axes:
    """n-ary op with broadcasting: dimensions that line up (right-aligned, same size) are coupled."""
    out_shape = ctx.out_shape()
    per_dim: list[list[Expr]] = [[] for _ in out_shape]
    for tensor in ctx.tensor_args():
        axes, shape = ctx.axes(tensor), ctx.shape(tensor)
        offset = len(out_shape) - len(shape)
        for d, (expr, size) in enumerate(zip(axes, shape)):
            if expr is not None and size == out_shape[offset + d]:
                per_dim[offset + d].append(expr)
    return tuple(ctx.unify_all(exprs) for exprs in per_dim)


@register("aten.zeros_like", "aten.ones_like", "aten.full_like", "aten.empty_like", "aten.rand_like",
          "aten.randn_like")
def like(ctx: RuleContext) -> Axes:
    """A new tensor shaped like its input: same channels (a rewrite must shrink it too)."""
    return ctx.axes(ctx.arg(0))


@register("aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax")
def softmax(ctx: RuleContext) -> Axes:
    axes = ctx.axes(ctx.arg(0))
    ctx.tag(axes[_dim(ctx.arg(1), len(axes))], "reduced")
    return axes


@register("aten.cumsum", "aten.cumprod", "aten.tril", "aten.triu", "aten.diff")
def along_dim_mixing(ctx: RuleContext) -> Axes:
    """Ops whose result mixes positions along a dim: channels there can no longer be sliced."""
    axes = ctx.axes(ctx.arg(0))
    if ctx.op_name().startswith(("aten.tril", "aten.triu")):
        mixed = [len(axes) - 2, len(axes) - 1]
    else:
        mixed = [_dim(ctx.arg(1 if "diff" not in ctx.op_name() else 2, default=-1), len(axes))]
    for d in mixed:
        ctx.tag(axes[d], "mixed")
    out = ctx.out_shape()
    return tuple(None if ctx.shape(ctx.arg(0))[d] != out[d] else e for d, e in enumerate(axes))


# --- reductions ---------------------------------------------------------------------------------
@register("aten.mean", "aten.sum", "aten.amax", "aten.amin", "aten.var", "aten.std", "aten.prod",
          "aten.linalg_vector_norm", "aten.norm", "aten.any", "aten.all", "aten.argmax", "aten.argmin",
          "aten.logsumexp", "aten.max.dim", "aten.min.dim")
def reduction(ctx: RuleContext) -> Axes | list[Axes]:
    axes = ctx.axes(ctx.arg(0))
    dims = _reduced_dims(ctx, len(axes))
    keepdim = bool(ctx.kwarg("keepdim", False)) or len(ctx.out_shape_of(0)) == len(axes)
    for d in dims:
        ctx.tag(axes[d], "reduced")
    out = tuple(None if d in dims else e for d, e in enumerate(axes))
    result = out if keepdim else tuple(e for d, e in enumerate(out) if d not in dims)
    return [result, result] if ctx.returns_tuple() else result


def _reduced_dims(ctx: RuleContext, ndim: int) -> set[int]:
    name = ctx.op_name()
    dim_arg = ctx.kwarg("dim", None)
    if dim_arg is None:
        position = 2 if "linalg_vector_norm" in name or name.startswith("aten.norm") else 1
        dim_arg = ctx.arg(position, default=None)
    if dim_arg is None or (isinstance(dim_arg, Sequence) and len(dim_arg) == 0):
        return set(range(ndim))
    if isinstance(dim_arg, int):
        return {_dim(dim_arg, ndim)}
    return {_dim(d, ndim) for d in dim_arg}


# --- normalization layers -----------------------------------------------------------------------
@register("aten.layer_norm", "aten.rms_norm", "aten.native_layer_norm")
def layer_norm(ctx: RuleContext) -> Axes:
    axes = ctx.axes(ctx.arg(0))
    normalized = len(ctx.arg(1))
    out = list(axes)
    for k in range(1, normalized + 1):
        exprs = [axes[-k]]
        for param in ctx.tensor_args()[1:]:
            exprs.append(ctx.axes(param)[-k])
        out[-k] = ctx.unify_all([e for e in exprs if e is not None])
        ctx.tag(out[-k], "reduced")
    return tuple(out)


# --- layout -------------------------------------------------------------------------------------
@register("aten.view", "aten._unsafe_view", "aten.reshape", "aten.flatten", "aten.unflatten",
          "aten.view_as", "aten.reshape_as")
def reshape(ctx: RuleContext) -> Axes:
    return ctx.reshape_axes(ctx.axes(ctx.arg(0)), ctx.shape(ctx.arg(0)), ctx.out_shape())


@register("aten.unsqueeze")
def unsqueeze(ctx: RuleContext) -> Axes:
    axes = list(ctx.axes(ctx.arg(0)))
    axes.insert(_dim(ctx.arg(1), len(axes) + 1), None)
    return tuple(axes)


@register("aten.squeeze")
def squeeze(ctx: RuleContext) -> Axes:
    axes, shape = ctx.axes(ctx.arg(0)), ctx.shape(ctx.arg(0))
    dim_arg = ctx.arg(1, default=None)
    dims = set(range(len(shape))) if dim_arg is None else (
        {_dim(dim_arg, len(shape))} if isinstance(dim_arg, int) else {_dim(d, len(shape)) for d in dim_arg})
    return tuple(e for d, e in enumerate(axes) if not (d in dims and shape[d] == 1))


@register("aten.permute")
def permute(ctx: RuleContext) -> Axes:
    axes = ctx.axes(ctx.arg(0))
    return tuple(axes[_dim(d, len(axes))] for d in ctx.arg(1))


@register("aten.transpose", "aten.swapaxes", "aten.t", "aten.numpy_T")
def transpose(ctx: RuleContext) -> Axes:
    axes = list(ctx.axes(ctx.arg(0)))
    if len(axes) < 2:
        return tuple(axes)
    d0, d1 = (_dim(ctx.arg(1), len(axes)), _dim(ctx.arg(2), len(axes))) if ctx.arg(1, default=None) is not None else (0, 1)
    axes[d0], axes[d1] = axes[d1], axes[d0]
    return tuple(axes)


@register("aten.expand", "aten.expand_as", "aten.broadcast_to")
def expand(ctx: RuleContext) -> Axes:
    """New leading dims carry no channels; a stretched size-1 dim of a channel tensor is a broadcast
    (repeat_kv's expand: its size is the number of query heads per KV head)."""
    axes = ctx.axes(ctx.arg(0))
    out_shape = ctx.out_shape()
    new = len(out_shape) - len(axes)
    tracked = any(e is not None for e in axes)
    stretched = [
        ((ctx.store.new_broadcast(size),),) if tracked and e is None and size > 1 and old == 1 else e
        for e, old, size in zip(axes, ctx.shape(ctx.arg(0)), out_shape[new:])
    ]
    return (None,) * new + tuple(stretched)


@register("aten.repeat_interleave.self_int")
def repeat_interleave(ctx: RuleContext) -> Axes:
    """Each channel repeated r times: (E) -> (E x bcast r). Mamba2 heads onto B/C groups, GQA."""
    axes = list(ctx.axes(ctx.arg(0)))
    repeats, dim = ctx.arg(1), ctx.arg(2, default=None)
    if dim is None:
        raise ctx.error("repeat_interleave without dim flattens the tensor", axes[0])
    d = _dim(dim, len(axes))
    if axes[d] is not None and repeats > 1:
        repeated = ctx.store.new_broadcast(repeats)
        axes[d] = tuple(seg + (repeated,) for seg in ctx.normalize(axes[d]))
    return tuple(axes)


@register("aten.repeat")
def repeat(ctx: RuleContext) -> Axes:
    """Tile: (E) -> (bcast k x E)."""
    axes = ctx.axes(ctx.arg(0))
    repeats = list(ctx.arg(1))
    new = len(repeats) - len(axes)
    out: list[Expr | None] = [None] * new
    for expr, k in zip(axes, repeats[new:]):
        out.append(expr if expr is None or k == 1 else ((ctx.store.new_broadcast(k), *ctx.single(expr)),))
    return tuple(out)


@register("aten.slice.Tensor", "aten.narrow")
def slice_(ctx: RuleContext) -> Axes:
    axes, shape = list(ctx.axes(ctx.arg(0))), ctx.shape(ctx.arg(0))
    d = _dim(ctx.arg(1, default=0), len(axes))
    if "narrow" in ctx.op_name():
        start = ctx.arg(2)
        start = start + shape[d] if start < 0 else start
        stop, step = start + ctx.arg(3), 1
    else:
        start, stop, step = ctx.arg(2, default=None), ctx.arg(3, default=None), ctx.arg(4, default=1)
        start, stop, step = slice(start, stop, step).indices(shape[d])
    if axes[d] is not None and (start, stop) != (0, shape[d]):
        if step != 1:
            raise ctx.error(f"strided slice (step {step}) over a channel axis", axes[d])
        axes[d] = ctx.take(axes[d], start, stop)
    return tuple(axes)


@register("aten.select.int")
def select(ctx: RuleContext) -> Axes:
    axes, shape = list(ctx.axes(ctx.arg(0))), ctx.shape(ctx.arg(0))
    d = _dim(ctx.arg(1), len(axes))
    if axes[d] is not None:
        index = ctx.arg(2) % shape[d]
        ctx.tag(ctx.take(axes[d], index, index + 1), "selected")
    del axes[d]
    return tuple(axes)


@register("aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unsafe_split",
          "aten.split_with_sizes_copy", "aten.tensor_split")
def split(ctx: RuleContext) -> list[Axes]:
    axes, shape = ctx.axes(ctx.arg(0)), ctx.shape(ctx.arg(0))
    d = _dim(ctx.arg(2, default=ctx.kwarg("dim", 0)), len(axes))
    outs: list[Axes] = []
    start = 0
    for out_shape in ctx.out_shapes():
        stop = start + out_shape[d]
        piece = list(axes)
        if axes[d] is not None:
            piece[d] = ctx.take(axes[d], start, stop)
        outs.append(tuple(piece))
        start = stop
    assert start == shape[d], "split sizes do not cover the dimension"
    return outs


@register("aten.unbind")
def unbind(ctx: RuleContext) -> list[Axes]:
    """select() of every index: a fused projection viewed as [.., 3, H, D] and unbound into q, k, v
    keeps its 3 fixed, and q, k and v share the H and D axes (their heads are coupled anyway)."""
    axes, size = ctx.axes(ctx.arg(0)), ctx.shape(ctx.arg(0))
    d = _dim(ctx.arg(1, default=0), len(axes))
    if axes[d] is not None:
        for index in range(size[d]):
            ctx.tag(ctx.take(axes[d], index, index + 1), "selected")
    return [axes[:d] + axes[d + 1:]] * size[d]


@register("getitem")
def getitem(ctx: RuleContext) -> Axes:
    return ctx.axes_list(ctx.arg(0))[ctx.arg(1)]


@register("aten.cat", "aten.concat", "aten.concatenate")
def cat(ctx: RuleContext) -> Axes:
    tensors = [t for t in ctx.arg(0) if len(ctx.shape(t)) > 1 or ctx.shape(t)[0] > 0]
    ndim = len(ctx.out_shape())
    d = _dim(ctx.arg(1, default=0), ndim)
    out: list[Expr | None] = []
    for k in range(ndim):
        if k == d:
            out.append(ctx.concat([(ctx.axes(t)[k], ctx.shape(t)[k]) for t in tensors]))
        else:
            out.append(ctx.unify_all([ctx.axes(t)[k] for t in tensors if ctx.axes(t)[k] is not None]))
    return tuple(out)


@register("aten.stack")
def stack(ctx: RuleContext) -> Axes:
    tensors = ctx.arg(0)
    ndim = len(ctx.shape(tensors[0]))
    merged = [ctx.unify_all([ctx.axes(t)[k] for t in tensors if ctx.axes(t)[k] is not None]) for k in range(ndim)]
    merged.insert(_dim(ctx.arg(1, default=0), ndim + 1), None)
    return tuple(merged)


@register("aten.pad", "aten.constant_pad_nd")
def pad(ctx: RuleContext) -> Axes:
    axes, shape = list(ctx.axes(ctx.arg(0))), ctx.shape(ctx.arg(0))
    pads = list(ctx.arg(1))
    for k in range(len(pads) // 2):
        d = len(axes) - 1 - k
        before, after = pads[2 * k], pads[2 * k + 1]
        if axes[d] is None or (before, after) == (0, 0):
            continue
        if before < 0 or after < 0:
            axes[d] = ctx.take(axes[d], max(-before, 0), shape[d] - max(-after, 0))
            before, after = max(before, 0), max(after, 0)
        axes[d] = ctx.concat([(None, before), (axes[d], ctx.expr_size(axes[d])), (None, after)])
    return tuple(axes)


@register("aten.index.Tensor")
def index(ctx: RuleContext) -> Axes:
    """Advanced indexing is allowed on untracked dims only (masks, positions)."""
    axes = ctx.axes(ctx.arg(0))
    indices = list(ctx.arg(1))
    indexed = [d for d, i in enumerate(indices) if i is not None]
    for d in indexed:
        if axes[d] is not None:
            raise ctx.error("advanced indexing (gather) over a channel axis", axes[d])
    kept = [e for d, e in enumerate(axes) if d not in indexed]
    if not any(e is not None for e in kept):
        return (None,) * len(ctx.out_shape())
    if indexed != list(range(indexed[0], indexed[-1] + 1)):
        raise ctx.error("non-adjacent advanced indices on a tensor with channel axes", next(e for e in kept if e))
    index_ndim = len(ctx.out_shape()) - len(kept)
    first = indexed[0]
    return tuple(axes[:first]) + (None,) * index_ndim + tuple(axes[indexed[-1] + 1:])


@register("aten.index_select")
def index_select(ctx: RuleContext) -> Axes:
    axes = list(ctx.axes(ctx.arg(0)))
    d = _dim(ctx.arg(1), len(axes))
    if axes[d] is not None:
        raise ctx.error("index_select over a channel axis", axes[d])
    return tuple(axes)


# --- contractions -------------------------------------------------------------------------------
@register("aten.linear")
def linear(ctx: RuleContext) -> Axes:
    x, weight = ctx.axes(ctx.arg(0)), ctx.axes(ctx.arg(1))
    ctx.unify(x[-1], weight[1])
    out = weight[0]
    bias = ctx.arg(2, default=None)
    if bias is not None:
        out = ctx.unify(out, ctx.axes(bias)[0])
    return tuple(x[:-1]) + (out,)


@register("aten.embedding")
def embedding(ctx: RuleContext) -> Axes:
    weight, indices = ctx.axes(ctx.arg(0)), ctx.axes(ctx.arg(1))
    ctx.tag(weight[0], "vocab")
    ctx.tag(weight[1], "embedding_dim")
    return tuple(indices) + (weight[1],)


@register("aten.matmul", "aten.mm", "aten.bmm")
def matmul(ctx: RuleContext) -> Axes:
    a_node, b_node = ctx.arg(0), ctx.arg(1)
    a, b = list(ctx.axes(a_node)), list(ctx.axes(b_node))
    a_vec, b_vec = len(a) == 1, len(b) == 1
    if a_vec:
        a = [None, *a]
    if b_vec:
        b = [*b, None]
    contracted = ctx.unify(a[-1], b[-2])
    a_batch, b_batch = a[:-2], b[:-2]
    n = max(len(a_batch), len(b_batch))
    a_shape = [1] * (n - len(a_batch)) + list(ctx.shape(a_node))[: len(a_batch)] if not a_vec else [1] * n
    b_shape = [1] * (n - len(b_batch)) + list(ctx.shape(b_node))[: len(b_batch)] if not b_vec else [1] * n
    a_batch = [None] * (n - len(a_batch)) + a_batch
    b_batch = [None] * (n - len(b_batch)) + b_batch
    batch = []
    for ea, eb, sa, sb in zip(a_batch, b_batch, a_shape, b_shape):
        exprs = [e for e, s in ((ea, sa), (eb, sb)) if e is not None and s == max(sa, sb)]
        batch.append(ctx.unify_all(exprs))
    if ctx.activations_meet(a_node, b_node):
        ctx.tag_contraction(batch=batch, contracted=[contracted], free=[a[-2], b[-1]])
    out = batch + ([] if a_vec else [a[-2]]) + ([] if b_vec else [b[-1]])
    return tuple(out)


@register("aten.addmm")
def addmm(ctx: RuleContext) -> Axes:
    bias, a, b = (ctx.axes(ctx.arg(i)) for i in range(3))
    ctx.unify(a[-1], b[0])
    return (a[0], ctx.unify(b[1], bias[-1]) if bias[-1] is not None else b[1])


_EINSUM_TERM = re.compile(r"^[a-zA-Z]*$")


@register("aten.einsum")
def einsum(ctx: RuleContext) -> Axes:
    equation: str = ctx.arg(0).replace(" ", "")
    operands = list(ctx.arg(1))
    inputs, _, output = equation.partition("->")
    terms = inputs.split(",")
    if not output and "->" not in equation:
        output = "".join(sorted(c for c in set(inputs) if inputs.count(c) == 1 and c != ","))
    if not all(_EINSUM_TERM.match(t) for t in [*terms, output]):
        raise ctx.error(f"einsum with ellipsis ({equation!r}) is not supported", None)
    letters: dict[str, list[Expr]] = {}
    for term, operand in zip(terms, operands):
        for letter, expr, size in zip(term, ctx.axes(operand), ctx.shape(operand)):
            letters.setdefault(letter, [])
            if expr is not None and size > 1:
                letters[letter].append(expr)
    merged = {letter: ctx.unify_all(exprs) for letter, exprs in letters.items()}
    if ctx.activations_meet(*operands):
        batch = [merged[c] for c in output if all(c in t for t in terms)]
        free = [merged[c] for c in output if not all(c in t for t in terms)]
        contracted = [merged[c] for c in letters if c not in output]
        ctx.tag_contraction(batch=batch, contracted=contracted, free=free)
    return tuple(merged[c] for c in output)


@register("aten.scaled_dot_product_attention")
def scaled_dot_product_attention(ctx: RuleContext) -> Axes:
    q, k, v = (ctx.axes(ctx.arg(i)) for i in range(3))
    q_heads, kv_heads = ctx.shape(ctx.arg(0))[-3], ctx.shape(ctx.arg(1))[-3]
    head_dim = ctx.unify(q[-1], k[-1])
    kv = ctx.unify(k[-3], v[-3])
    if kv is not None and q_heads != kv_heads:  # enable_gqa: KV heads repeat_interleave'd
        repeated = ctx.store.new_broadcast(q_heads // kv_heads)
        kv = tuple(seg + (repeated,) for seg in ctx.normalize(kv))
    heads = ctx.unify(q[-3], kv) if q_heads == kv_heads or q[-3] is not None else q[-3]
    ctx.tag_contraction(batch=[heads], contracted=[head_dim], free=[v[-1]])
    for expr in (heads, head_dim, v[-1]):
        ctx.tag(expr, "attention")
    return tuple(q[:-1]) + (v[-1],)


@register("aten.conv1d", "aten.convolution", "aten.conv2d")
def convolution(ctx: RuleContext) -> Axes:
    x, weight = ctx.axes(ctx.arg(0)), ctx.axes(ctx.arg(1))
    bias_node = ctx.arg(2, default=None)
    groups = ctx.arg(8 if "convolution" in ctx.op_name() else 6, default=1)
    in_channels = ctx.shape(ctx.arg(0))[1]
    for expr in weight[2:]:
        ctx.tag(expr, "kernel")
    if groups == 1:
        ctx.unify(x[1], weight[1])
        channels = weight[0]
    elif groups == in_channels and ctx.shape(ctx.arg(1))[1] == 1:
        channels = ctx.unify(x[1], weight[0])  # depthwise: channel i only sees channel i
        ctx.tag(channels, "depthwise_conv")
    else:
        raise ctx.error(f"grouped convolution (groups={groups}) is not supported", x[1])
    if bias_node is not None:
        channels = ctx.unify(channels, ctx.axes(bias_node)[0])
    return (x[0], channels) + (None,) * (len(x) - 2)


# --- ops that carry no channels into their result -----------------------------------------------
@register("aten.arange", "aten.ones", "aten.zeros", "aten.full", "aten.empty", "aten.scalar_tensor",
          "aten.rand", "aten.randn", "aten.eye", "aten.new_ones", "aten.new_zeros", "aten.new_full",
          "aten.new_empty", "aten.tensor", "aten._assert_tensor_metadata", "aten.sym_size",
          "aten._assert_scalar", "aten.item", "aten._local_scalar_dense", "aten.sym_constrain_range_for_size",
          "aten.empty_strided", "aten.lift_fresh")
def untracked(ctx: RuleContext) -> Axes | None:
    shape = ctx.out_shape_or_none()
    return None if shape is None else (None,) * len(shape)


# --- the other direction: rewrite constant arguments when channel axes shrink ---------------------
# A rewrite rule gets a RewriteContext (graphprune/rewrite.py) and returns the node's new args, or
# None to leave them. Ops whose arguments hold no channel sizes need none.
REWRITES: dict[str, Callable[[Any], tuple | None]] = {}
register_rewrite = _registrar(REWRITES)


def rewrite_for(target: Any) -> Callable | None:
    return _lookup(REWRITES, target)


@register_rewrite("aten.view", "aten._unsafe_view", "aten.reshape", "aten.expand")
def rewrite_shape(ctx) -> tuple:
    """Channel entries take their kept sizes. -1 and entries without channels stay as they are, among them
    the symbolic batch and sequence sizes of a dynamic trace (graph nodes: `sym_size` and arithmetic on
    it), so the rewritten graph still runs at any batch and length. A view entry that is symbolic and holds
    channels too (sequence x channels merged) becomes -1: the view infers it."""
    shape = []
    for size, expr in zip(ctx.arg(1), ctx.out_axes()):
        symbolic = isinstance(size, torch.fx.Node)
        if expr is None or size == -1 or (symbolic and "expand" in str(ctx.node.target)):
            shape.append(size)  # an expand to a symbolic size broadcasts a size-1 dim: nothing to shrink
        elif symbolic:
            shape.append(-1)
        else:
            shape.append(ctx.kept(expr))
    if sum(1 for size in shape if size == -1) > 1 and "expand" not in str(ctx.node.target):
        from .analysis import AnalysisError

        raise AnalysisError(f"{ctx.node.name} ({ctx.node.target}): a view merges symbolic sizes with pruned "
                            "channels in more than one dimension; the pruned graph cannot infer its shape")
    return (ctx.arg(0), shape, *ctx.node.args[2:])


@register_rewrite("aten.split_with_sizes", "aten.split.Tensor")
def rewrite_split(ctx) -> tuple:
    x = ctx.arg(0)
    dim = ctx.arg(2, 0) % len(ctx.in_axes(x))
    if ctx.in_axes(x)[dim] is None:
        return ctx.node.args
    ctx.node.target = torch.ops.aten.split_with_sizes.default
    return (x, [ctx.kept(out[dim]) for out in ctx.out_axes()], dim)


@register_rewrite("aten.slice.Tensor", "aten.narrow")
def rewrite_slice(ctx) -> tuple:
    x, dim = ctx.arg(0), ctx.arg(1, 0) % len(ctx.in_axes(ctx.arg(0)))
    expr = ctx.in_axes(x)[dim]
    if expr is None:
        return ctx.node.args
    size = ctx.in_shape(x)[dim]
    if "narrow" in str(ctx.node.target):
        start = ctx.arg(2) % size
        new_start = ctx.kept_before(expr, start)
        return (x, ctx.arg(1), new_start, ctx.kept_before(expr, start + ctx.arg(3)) - new_start)
    start, stop, step = slice(ctx.arg(2, None), ctx.arg(3, None), ctx.arg(4, 1)).indices(size)
    return (x, ctx.arg(1), ctx.kept_before(expr, start), ctx.kept_before(expr, stop), step)


@register_rewrite("aten.select.int")
def rewrite_select(ctx) -> tuple:
    x, dim = ctx.arg(0), ctx.arg(1) % len(ctx.in_axes(ctx.arg(0)))
    expr = ctx.in_axes(x)[dim]
    if expr is None:
        return ctx.node.args
    return (x, ctx.arg(1), ctx.kept_before(expr, ctx.arg(2) % ctx.in_shape(x)[dim]))


@register_rewrite("aten.conv1d", "aten.convolution", "aten.conv2d")
def rewrite_conv(ctx) -> tuple:
    position = 8 if "convolution" in str(ctx.node.target) else 6
    groups = ctx.arg(position, 1)
    if groups == 1:
        return ctx.node.args
    args = list(ctx.node.args)
    args[position] = ctx.kept(ctx.out_axes()[1])
    return tuple(args)


@register_rewrite("aten.repeat_interleave.self_int")
def rewrite_repeat_interleave(ctx) -> tuple:
    """The repeat count is the number of heads per group: it shrinks with the heads it feeds."""
    dim = ctx.arg(2) % len(ctx.out_axes())
    expr = ctx.out_axes()[dim]
    if expr is None:
        return ctx.node.args
    repeated = ctx.store.normalize(expr)[0][-1]
    if ctx.node.kwargs.get("output_size") is not None:
        ctx.node.kwargs = {**ctx.node.kwargs, "output_size": ctx.kept(expr)}
    return (ctx.arg(0), ctx.kept(((repeated,),)), *ctx.node.args[2:])


@register_rewrite("aten.layer_norm", "aten.rms_norm")
def rewrite_norm(ctx) -> tuple:
    axes = ctx.in_axes(ctx.arg(0))
    shape = list(ctx.arg(1))
    new = [size if e is None else ctx.kept(e) for size, e in zip(shape, axes[len(axes) - len(shape):])]
    return (ctx.arg(0), new, *ctx.node.args[2:])
