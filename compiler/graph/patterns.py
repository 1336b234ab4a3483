"""fxforge.patterns: graph rewriting with rules written as small traced functions.

A rule pairs a pattern with what replaces it; a rule table reads like the identities it applies::

    from fxforge import patterns as P

    RULES = [
        # x * sigmoid(x) -> silu(x)
        P.Rule(lambda x: x * torch.sigmoid(x), lambda x: F.silu(x)),
    ]

    @fxforge.graph_pass(name="my-rewrites")
    def my_rewrites(gm, ctx):
        return P.rewrite(gm, RULES, ctx)       # a PassResult: the report shows how often each rule fired

An op in a pattern matches all of its spellings (``fxforge.graph.ops``), modules match by type
(``P.module``), the pattern's parameters are wildcards, and ``where=`` adds constraints (``P.meta``,
``P.attrs``, or a function of the match). Nodes are visited from the graph's end backwards, rules in table
order, first match wins, and a node takes part in one match at most. A match is self-contained (only its last
node, the anchor, has users outside it; no side-effecting node sits inside), because the replacement, a
traced function or ``build=fn(match)`` (None declines), runs where the anchor ran. docs/writing-passes.md
gives the full rules and why this is not torch.fx's SubgraphMatcher.
"""

from __future__ import annotations

import contextvars
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from fxforge.errors import ConfigError

from .matching import mutation_between
from .meta import record_rewrite, tensor_info
from .ops import COMMUTATIVE, REPRESENTATIVE, call_operands, canonical_op, module_op, submodule
from .result import PassResult

__all__ = ["Match", "Rule", "any_node", "attrs", "find", "meta", "module", "rewrite"]

# ---------------------------------------------------------------------------------------------------------
# Pattern-only ops: module types and wildcards, recorded as call_function nodes whose target is the op.
_TRACER: contextvars.ContextVar[fx.Tracer | None] = contextvars.ContextVar("fxforge_pattern_tracer", default=None)


class PatternOp:
    """A node kind that exists only in patterns; calling it while a pattern is traced records it."""

    label = "op"

    def __init__(self, name: str | None) -> None:
        self.node_name = name
        self.__name__ = name or self.label  # fx names the pattern node after this

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tracer = _TRACER.get()
        if tracer is None:
            raise ConfigError(f"{self!r} is a pattern element: call it inside a pattern given to fxforge.patterns.Rule")
        return tracer.create_proxy("call_function", self, args, kwargs, name=self.node_name)

    def operands(self, node: fx.Node, n_args: int, module_of: Callable[[fx.Node], nn.Module]) -> tuple | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.__name__


class ModuleOp(PatternOp):
    """Matches a call_module node whose module is an instance of ``types`` with the given attributes."""

    label = "module"

    def __init__(self, types: tuple[type, ...], attributes: Mapping[str, Any], name: str | None = None) -> None:
        self.types, self.attributes = types, dict(attributes)
        self.label = "|".join(t.__name__ for t in types)
        super().__init__(name)

    def operands(self, node: fx.Node, n_args: int, module_of: Callable[[fx.Node], nn.Module]) -> tuple | None:
        if node.op != "call_module":
            return None
        mod = module_of(node)
        if not isinstance(mod, self.types) or not _attributes_hold(mod, self.attributes):
            return None
        return (*node.args, *sorted(node.kwargs.items()))


class AnyOp(PatternOp):
    """Matches any call (function, method or module) whose first inputs match the arguments it is given."""

    label = "any"

    def __init__(self, where: Callable[[fx.Node], bool] | None, name: str | None = None) -> None:
        self.where = where
        super().__init__(name)

    def operands(self, node: fx.Node, n_args: int, module_of: Callable[[fx.Node], nn.Module]) -> tuple | None:
        if node.op not in ("call_function", "call_method", "call_module") or len(node.args) < n_args:
            return None
        return tuple(node.args[:n_args]) if self.where is None or self.where(node) else None


def module(*types: type, name: str | None = None, **attributes: Any) -> ModuleOp:
    """A pattern element: a call of a module of one of ``types``, e.g. ``P.module(nn.Conv2d, groups=1)(x)``.

    An attribute value is compared with ``==``, or called with the module's attribute when callable
    (``padding_mode=lambda v: v != "circular"``). ``name`` names the node for ``where=`` and ``match[name]``.
    """
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise ConfigError(f"P.module needs nn.Module subclasses, got {types!r}")
    return ModuleOp(types, attributes, name)


def any_node(where: Callable[[fx.Node], bool] | None = None, name: str | None = None) -> AnyOp:
    """A wildcard call: ``P.any_node(where=is_activation)(y)`` matches any call whose first argument is
    ``y`` and for which ``where(node)`` holds; called with no arguments, any call at all."""
    return AnyOp(where, name)


def _attributes_hold(mod: nn.Module, attributes: Mapping[str, Any]) -> bool:
    for key, expected in attributes.items():
        if not hasattr(mod, key):
            return False
        actual = getattr(mod, key)
        if not (expected(actual) if callable(expected) else _equal_literals(actual, expected)):
            return False
    return True


# ---------------------------------------------------------------------------------------------------------
# Constraints for where={...}: called with the matched value (a node, or a constant for a parameter).
class meta:  # noqa: N801 - used like a function: P.meta(dtype=torch.float32)
    """The matched value is a tensor node with this dtype (or one of these), rank and/or shape (``None`` in
    a shape matches any size). Reads ``meta["tensor_meta"]`` or a capture path's example value; a node with
    neither does not match (``rewrite`` with a ctx propagates shapes first)."""

    needs_shapes = True

    def __init__(self, *, dtype: torch.dtype | Sequence[torch.dtype] | None = None, rank: int | None = None,
                 shape: Sequence[int | None] | None = None) -> None:
        self.dtypes = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype) if dtype is not None else None
        self.rank, self.shape = rank, tuple(shape) if shape is not None else None

    def __call__(self, value: Any) -> bool:
        info = tensor_info(value) if isinstance(value, fx.Node) else None
        if info is None:
            return False
        shape = tuple(info.shape)
        return ((self.dtypes is None or info.dtype in self.dtypes)
                and (self.rank is None or len(shape) == self.rank)
                and (self.shape is None or self._shape_fits(shape)))

    def _shape_fits(self, shape: tuple[int, ...]) -> bool:
        if len(shape) != len(self.shape):
            return False
        return all(want is None or want == size for want, size in zip(self.shape, shape, strict=True))

    def __repr__(self) -> str:
        return f"meta(dtype={self.dtypes}, rank={self.rank}, shape={self.shape})"


class attrs:  # noqa: N801 - used like a function: P.attrs(groups=1)
    """The matched value is a call_module node whose module has these attributes (values or predicates)."""

    needs_shapes = False

    def __init__(self, **attributes: Any) -> None:
        self.attributes = attributes

    def __call__(self, value: Any) -> bool:
        if not isinstance(value, fx.Node) or value.op != "call_module":
            return False
        return _attributes_hold(submodule(value), self.attributes)


# ---------------------------------------------------------------------------------------------------------
# Patterns: traced, then each node gets a spec saying what it matches.
class _PatternTracer(fx.Tracer):
    """Traces pattern code: every module call becomes one node (a canonical op or a ModuleOp)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        op = module_op(m)
        if op in REPRESENTATIVE:
            return self.create_proxy("call_function", REPRESENTATIVE[op], args, kwargs, name=self._module_name(m))
        return self.create_proxy("call_function", ModuleOp((type(m),), {}), args, kwargs, name=self._module_name(m))

    def _module_name(self, m: nn.Module) -> str | None:
        return next((name for name, sub in self.root.named_modules() if sub is m and name), None)


def _trace(fn: Callable | nn.Module, tracer: fx.Tracer) -> fx.Graph:
    token = _TRACER.set(tracer)
    try:
        return tracer.trace(fn)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot trace the pattern or replacement {getattr(fn, '__qualname__', fn)!r}: "
                          f"{type(exc).__name__}: {exc}. Write it as plain tensor code (no Python control flow "
                          f"on tensors)") from exc
    finally:
        _TRACER.reset(token)


def _output(graph: fx.Graph) -> Any:
    return next(n for n in reversed(graph.nodes) if n.op == "output").args[0]


class Pattern:
    """A traced pattern: one result (the anchor), its parameters (wildcards) and per-node match specs."""

    def __init__(self, fn: Callable | nn.Module) -> None:
        self.graph = _trace(fn, _PatternTracer())
        self.anchor = _output(self.graph)
        if not isinstance(self.anchor, fx.Node) or self.anchor.op == "placeholder":
            raise ConfigError("a pattern must return one value computed from its inputs (not a tuple, not an input)")
        self.inputs = [n for n in self.graph.nodes if n.op == "placeholder"]
        self.nodes = {n.name: n for n in self.graph.nodes if n.op != "output"}
        self._check_connected()
        self.specs = {pn: _spec(pn) for pn in self.nodes.values() if pn.op != "placeholder"}

    def _check_connected(self) -> None:
        used, todo = set(), [self.anchor]
        while todo:
            node = todo.pop()
            if node not in used:
                used.add(node)
                todo.extend(node.all_input_nodes)
        unused = [n.name for n in self.nodes.values() if n not in used]
        if unused:
            raise ConfigError(f"pattern nodes {unused} do not feed its result: a pattern is what computes its "
                              f"return value (drop them, or return them instead)")

    def expr(self) -> str:
        """The pattern as an expression, e.g. ``mul(x, sigmoid(x))`` (rule names in reports)."""
        return _expr(self.anchor)


Spec = tuple[Any, tuple]  # (what a node must be: canonical op, PatternOp or (op, target); its operands)


def _spec(pn: fx.Node) -> Spec:
    """What pattern node ``pn`` matches, and its operands in the form a target node's will be read."""
    if isinstance(pn.target, PatternOp):
        return pn.target, (*pn.args, *sorted(pn.kwargs.items()))
    canonical = canonical_op(pn)
    if canonical is not None:
        return canonical
    if pn.op == "get_attr":
        raise ConfigError(f"pattern node '{pn.name}' reads an attribute; use a parameter or P.module instead")
    return (pn.op, pn.target), call_operands(pn)


def _expr(node: Any) -> str:
    """A pattern (or replacement) value as an expression."""
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "placeholder":
        return node.name
    kind, operands = _spec(node)
    if isinstance(kind, tuple):  # a plain call: its function or method name and positional arguments
        label, operands = getattr(kind[1], "__name__", kind[1]), [o for o in node.args if o is not None]
    else:
        label = kind if isinstance(kind, str) else kind.__name__  # a pattern op: its name, else its types
    return f"{label}({', '.join(_expr(o) for o in operands)})"


# ---------------------------------------------------------------------------------------------------------
# Matching: a backtracking search from the anchor towards the inputs, yielding every consistent binding.
Env = dict  # pattern node -> matched value


def _equal_literals(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # tensors and other values without a plain truth value
        return a is b


class _View:
    """Memos for one sweep over a graph, shared by all rules: modules by path (``get_submodule`` walks the
    path on every call), each node's canonical op and what each pattern op makes of it. A commit clears
    them: builders may replace modules and rewire nodes."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules: dict[str, nn.Module] = {}
        self.memo: dict[tuple[Any, fx.Node], Any] = {}

    def module(self, node: fx.Node) -> nn.Module:
        target = str(node.target)
        if target not in self.modules:
            self.modules[target] = self.gm.get_submodule(target)
        return self.modules[target]

    def canonical(self, node: fx.Node) -> tuple[str, tuple] | None:
        key = (None, node)
        if key not in self.memo:
            self.memo[key] = canonical_op(node, self.module)
        return self.memo[key]

    def pattern_op(self, op: PatternOp, node: fx.Node, n_args: int) -> tuple | None:
        key = (op, n_args, node)
        if key not in self.memo:
            self.memo[key] = op.operands(node, n_args, self.module)
        return self.memo[key]

    def clear(self) -> None:
        self.modules.clear()
        self.memo.clear()


class _Search:
    """Every way one rule's pattern matches at a node, as environments (pattern node -> value)."""

    def __init__(self, rule: Rule, claimed: set[fx.Node], view: _View) -> None:
        self.rule, self.constraints, self.claimed, self.view = rule, rule.constraints, claimed, view
        self.specs = rule.pattern.specs

    def node(self, pn: fx.Node, value: Any, env: Env) -> Iterator[Env]:
        if pn in env:
            if env[pn] is value or (pn.op == "placeholder" and _equal_literals(env[pn], value)):
                yield env
            return
        if pn.op == "placeholder":
            if self._holds(pn, value):
                yield {**env, pn: value}
            return
        alternatives = self._alternatives(pn, value) if self._may_bind(value, env) else ()
        holds = None  # constraints are user code, often dearer than structure: checked once the inputs match
        for operands in alternatives:
            for found in self.operands(self.specs[pn][1], operands, {**env, pn: value}):
                holds = self._holds(pn, value) if holds is None else holds
                if not holds:
                    return
                yield found

    def _holds(self, pn: fx.Node, value: Any) -> bool:
        return all(check(value) for check in self.constraints.get(pn.name, ()))

    def _may_bind(self, value: Any, env: Env) -> bool:
        return (isinstance(value, fx.Node) and value not in self.claimed
                and not any(v is value for p, v in env.items() if p.op != "placeholder"))

    def _alternatives(self, pn: fx.Node, node: fx.Node) -> list[tuple]:
        kind, p_operands = self.specs[pn]
        if isinstance(kind, PatternOp):
            found = self.view.pattern_op(kind, node, len(pn.args))
            return [found] if found is not None and len(found) == len(p_operands) else []
        if isinstance(kind, str):
            canonical = self.view.canonical(node)
            if canonical is None or canonical[0] != kind:
                return []
            args = canonical[1]
            return [args, args[::-1]] if kind in COMMUTATIVE and args[0] is not args[1] else [args]
        if (node.op, node.target) != kind:
            return []
        return [call_operands(node)]

    def operands(self, pattern_values: Sequence, values: Sequence, env: Env) -> Iterator[Env]:
        if len(pattern_values) != len(values):
            return
        if not pattern_values:
            yield env
            return
        for env2 in self.value(pattern_values[0], values[0], env):
            yield from self.operands(pattern_values[1:], values[1:], env2)

    def value(self, pv: Any, v: Any, env: Env) -> Iterator[Env]:
        if isinstance(pv, fx.Node):
            yield from self.node(pv, v, env)
        elif isinstance(pv, (tuple, list)) and isinstance(v, (tuple, list)):
            yield from self.operands(pv, v, env)
        elif isinstance(pv, dict) and isinstance(v, dict) and pv.keys() == v.keys():
            yield from self.operands(list(pv.values()), [v[k] for k in pv], env)
        elif _equal_literals(pv, v):
            yield env


# ---------------------------------------------------------------------------------------------------------
# Rules and matches.
class Match:
    """A match of a rule: ``match["x"]`` is what pattern node ``x`` matched (a node, or the constant a
    parameter bound to); ``match.module("conv")`` the module a matched call_module node calls."""

    def __init__(self, rule: Rule, gm: fx.GraphModule, env: Env, order: Mapping[fx.Node, int],
                 options: Any) -> None:
        self.rule, self.gm, self.options = rule, gm, options
        self.values = {pn.name: value for pn, value in env.items()}
        self.inputs = {pn.name: env[pn] for pn in rule.pattern.inputs if pn in env}
        self.nodes = sorted((v for pn, v in env.items() if pn.op != "placeholder"), key=order.__getitem__)
        self.anchor: fx.Node = env[rule.pattern.anchor]

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def __getitem__(self, name: str) -> Any:
        if name not in self.values:
            raise KeyError(f"pattern has no node '{name}'; names: {', '.join(self.values)}")
        return self.values[name]

    def module(self, name: str) -> nn.Module:
        return self.gm.get_submodule(str(self[name].target))

    def __repr__(self) -> str:
        return f"Match({self.rule.name}: {', '.join(n.name for n in self.nodes)})"


Where = Mapping[str, Callable[[Any], bool] | Sequence[Callable[[Any], bool]]] | Callable[[Match], bool] | None


class Rule:
    """``Rule(pattern, replacement)`` or ``Rule(pattern, build=fn)``; see the module docstring.

    ``pattern``: a function (or nn.Module) over wildcard inputs. ``replacement``: a function of (some of)
    the pattern's parameter names, traced and spliced in. ``build(match) -> fx.Node | None``: builds the
    replacement itself (None declines). ``where``: constraints by pattern node name, or ``fn(match) -> bool``.
    ``name``: how the report lists the rule (default: ``pattern -> replacement`` as expressions).
    """

    def __init__(self, pattern: Callable | nn.Module, replacement: Callable | None = None, *,
                 build: Callable[[Match], fx.Node | None] | None = None, where: Where = None,
                 name: str | None = None) -> None:
        if (replacement is None) == (build is None):
            raise ConfigError("a Rule needs exactly one of replacement= (a function) or build= (a callback)")
        self.pattern = pattern if isinstance(pattern, Pattern) else Pattern(pattern)
        self.build, self.replacement = build, None
        if replacement is not None:
            self.replacement = self._trace_replacement(replacement)
        self.constraints, self.check = self._constraints(where)
        self.needs_shapes = any(getattr(c, "needs_shapes", False) for cs in self.constraints.values() for c in cs)
        rhs = _expr(_output(self.replacement)) if self.replacement is not None else build.__name__
        self.name = name or f"{self.pattern.expr()} -> {rhs}"

    def _trace_replacement(self, fn: Callable) -> fx.Graph:
        graph = _trace(fn, fx.Tracer())
        if not isinstance(_output(graph), fx.Node):
            raise ConfigError("a replacement function must return one tensor (a pattern input or a new value)")
        names = {p.name for p in self.pattern.inputs}
        for node in graph.nodes:
            if node.op == "placeholder" and node.name not in names:
                raise ConfigError(f"replacement parameter '{node.name}' is not a pattern input ({sorted(names)})")
            if node.op in ("call_module", "get_attr"):
                raise ConfigError(f"replacement functions cannot create modules or read attributes "
                                  f"('{node.name}'): use build= to add modules")
        return graph

    def _constraints(self, where: Where) -> tuple[dict[str, list], Callable[[Match], bool] | None]:
        if where is None or callable(where) and not isinstance(where, Mapping):
            return {}, where
        known = self.pattern.nodes
        table = {}
        for key, checks in where.items():
            if key not in known:
                raise ConfigError(f"where= names '{key}', which is not a pattern node; names: {', '.join(known)}")
            table[key] = list(checks) if isinstance(checks, (list, tuple)) else [checks]
        return table, None

    def __repr__(self) -> str:
        return f"Rule({self.name})"


# ---------------------------------------------------------------------------------------------------------
# Rewriting.
def _side_effects_between(gm: fx.GraphModule, nodes: list[fx.Node]) -> bool:
    """Would running the match's computation at its anchor skip past a mutation?"""

    return len(nodes) > 1 and mutation_between(nodes[0], nodes[-1], gm)


def _self_contained(match: Match) -> bool:
    inner = set(match.nodes)
    if any(isinstance(v, fx.Node) and v in inner for v in match.inputs.values()):
        return False  # an input that is also computed inside the match
    return all(set(n.users) <= inner for n in match.nodes if n is not match.anchor)


def _first_match(search: _Search, node: fx.Node, order: Mapping[fx.Node, int], options: Any,
                 apply: bool) -> tuple[Match, Any] | None:
    rule, gm = search.rule, search.view.gm
    if not search._alternatives(rule.pattern.anchor, node):  # the common case, without building generators
        return None
    for env in search.node(rule.pattern.anchor, node, {}):
        match = Match(rule, gm, env, order, options)
        if not _self_contained(match) or (rule.check and not rule.check(match)):
            continue
        if _side_effects_between(gm, match.nodes):
            continue
        if not apply:
            return match, None
        new = _replacement(match)
        if isinstance(new, fx.Node):  # None: the builder declined; a constant cannot stand for a node here
            return match, new
    return None


def _replacement(match: Match) -> Any:
    graph = match.graph
    with graph.inserting_before(match.anchor):
        if match.rule.build is not None:
            return match.rule.build(match)
        env = {p: match.inputs[p.name] for p in match.rule.replacement.nodes if p.op == "placeholder"}
        return graph.graph_copy(match.rule.replacement, env)


def _commit(match: Match, new: Any, by: str) -> None:
    anchor = match.anchor
    if new is not anchor:
        anchor.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    if isinstance(new, fx.Node) and not any(new is v for v in match.inputs.values()):
        record_rewrite(new, by, *match.nodes)
    for node in reversed(match.nodes):
        if not node.users and node is not new:
            match.graph.erase_node(node)


def _sweep(gm: fx.GraphModule, rules: Sequence[Rule], options: Any, apply: bool, by: str) -> list[Match]:
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    claimed: set[fx.Node] = set()
    view = _View(gm)
    searches = [_Search(rule, claimed, view) for rule in rules]
    found = []
    for node in reversed(nodes):
        if node in claimed or node.op in ("placeholder", "output", "get_attr"):
            continue
        for search in searches:
            hit = _first_match(search, node, order, options, apply)
            if hit is not None:
                claimed.update(hit[0].nodes)
                if apply:
                    _commit(hit[0], hit[1], by)
                    view.clear()
                found.append(hit[0])
                break
    return found


def _check_rules(rules: Sequence[Rule]) -> None:
    bad = [r for r in rules if not isinstance(r, Rule)]
    if bad:
        raise ConfigError(f"rewrite expects fxforge.patterns.Rule objects, got {bad[0]!r}")


def find(gm: fx.GraphModule, rules: Rule | Sequence[Rule], options: Any = None) -> list[Match]:
    """The matches ``rewrite`` would rewrite (without builders declining any), in visit order; no change."""
    rules = [rules] if isinstance(rules, Rule) else list(rules)
    _check_rules(rules)
    return _sweep(gm, rules, options, apply=False, by="")


def rewrite(gm: fx.GraphModule, rules: Rule | Sequence[Rule], ctx: Any = None, *, options: Any = None) -> PassResult:
    """Apply ``rules`` once over ``gm`` (in place) and return a PassResult whose ``matches`` counts each rule.

    ``ctx`` (the pass's PassContext): shapes are propagated first when a rule has a ``P.meta`` constraint,
    and rewritten nodes record the running pass as their author. ``options`` reaches builders as
    ``match.options`` (e.g. the pass instance with its options).
    """
    rules = [rules] if isinstance(rules, Rule) else list(rules)
    _check_rules(rules)
    if ctx is not None and any(r.needs_shapes for r in rules):
        ctx.shapes(gm)
    by = getattr(ctx, "current_pass", "") or "fxforge.patterns"
    found = _sweep(gm, rules, options, apply=True, by=by)
    if found:
        gm.delete_all_unused_submodules()
    counts = Counter(m.rule.name for m in found)
    return PassResult(gm, bool(found), matches={r.name: counts[r.name] for r in rules if counts[r.name]})
