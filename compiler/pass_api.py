"""The pass API: ``Pass``, ``PassResult``, ``@graph_pass`` and the registry of passes by name.

Built-in passes and users' passes go through the same door: a pass is a frozen dataclass whose fields are
its options, with a kebab-case ``name`` and the graph properties it ``requires``, ``provides`` and
``invalidates``. ``@graph_pass`` turns a plain function ``(gm, ctx, **options) -> bool | PassResult`` into one.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import fx

from .errors import ConfigError, suggest
from .pipeline import PassSpec

if TYPE_CHECKING:
    from .context import PassContext

_REGISTRY: dict[str, type[Pass]] = {}


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) graph module, whether it changed, and notes for the report."""

    gm: fx.GraphModule
    modified: bool
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Pass:
    """Base class of every pass. Subclasses are frozen dataclasses; their fields are the pass options."""

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def spec(self) -> PassSpec:
        """This pass as pipeline text: its name and the options that differ from their defaults."""
        options = tuple(
            (f.name, format_option(getattr(self, f.name)))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        )
        return PassSpec(self.name, options)


def format_option(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _coerce(value: str, kind: Any, where: str) -> Any:
    """Pipeline option text -> the option field's type (bool, int, float or str)."""
    if kind is bool:
        if value.lower() not in ("true", "false"):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value.lower() == "true"
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}") from None


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Register a Pass subclass under its ``name`` (kebab-case, unique)."""
    if not cls.name:
        raise ConfigError(f"{cls.__qualname__} has no `name`; give it a kebab-case name such as 'fold-bn'")
    old = _REGISTRY.get(cls.name)
    # Re-defining the same pass (a re-run notebook cell, a reloaded module) replaces it; another one clashes.
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ConfigError(f"a pass named '{cls.name}' is already registered ({old.__module__}.{old.__qualname__}): "
                          f"give yours another name")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    return dict(_REGISTRY)


def pass_class(name: str) -> type[Pass]:
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigError(f"unknown pass '{name}'.{suggest(name, _REGISTRY)} Known passes: {known}")
    return _REGISTRY[name]


def instantiate(spec: PassSpec) -> Pass:
    """Build a pass from its spec, converting option text to the option types."""
    cls = pass_class(spec.name)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in spec.options:
        if key not in fields:
            valid = ", ".join(sorted(fields)) or "none"
            raise ConfigError(f"pass '{spec.name}' has no option '{key}'.{suggest(key, fields)} Options: {valid}")
        kwargs[key] = _coerce(value, hints[key], f"option '{key}' of pass '{spec.name}'")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # __post_init__ validation of option values
        raise ConfigError(f"pass '{spec.name}': {exc}") from None


def graph_pass(
    name: str,
    *,
    requires: tuple[str, ...] = (),
    provides: tuple[str, ...] = (),
    invalidates: tuple[str, ...] = (),
) -> Callable[[Callable[..., bool | PassResult]], type[Pass]]:
    """Turn ``fn(gm, ctx, **options) -> bool | PassResult`` into a registered pass.

    Keyword parameters after ``gm, ctx`` become the pass options; each needs a default, whose type is the
    option's type (bool, int, float or str)::

        @fxforge.graph_pass(name="drop-asserts")
        def drop_asserts(gm, ctx, keep_messages: bool = False) -> bool: ...
    """

    def wrap(fn: Callable[..., bool | PassResult]) -> type[Pass]:
        params = list(inspect.signature(fn).parameters.values())[2:]
        for p in params:
            if p.default is inspect.Parameter.empty:
                raise ConfigError(f"option '{p.name}' of pass '{name}' needs a default value")
        # An option's type is its default's type: annotations may be strings that cannot be resolved here.
        option_fields = [(p.name, type(p.default), field(default=p.default)) for p in params]

        def __call__(self: Pass, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
            out = fn(gm, ctx, **{p.name: getattr(self, p.name) for p in params})
            return out if isinstance(out, PassResult) else PassResult(gm, bool(out))

        cls = dataclasses.make_dataclass(
            "".join(part.title() for part in name.split("-")) + "Pass",
            option_fields,
            bases=(Pass,),
            frozen=True,
            namespace={
                "name": name,
                "requires": frozenset(requires),
                "provides": frozenset(provides),
                "invalidates": frozenset(invalidates),
                "__call__": __call__,
                "__doc__": fn.__doc__,
            },
        )
        # The function's identity is the pass's identity (errors, re-registration). Set after creation:
        # Python 3.12's make_dataclass stamps the *caller's* module (this file) on the class.
        cls.__module__, cls.__qualname__ = fn.__module__, fn.__qualname__
        return register_pass(cls)

    return wrap
