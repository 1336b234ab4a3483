"""The pass API: ``Pass``, ``PassResult``, ``@graph_pass`` and the registry of passes by name.

Built-in passes and users' passes go through the same door: a pass is a frozen dataclass whose fields are
its options, with a kebab-case ``name`` and the graph properties it ``requires``, ``provides`` and
``invalidates``. ``@graph_pass`` turns a plain function ``(gm, ctx, **options) -> bool | PassResult`` into one.
A registered name works in pipeline text, ``compile(extra_passes=...)`` and error messages.

Passes from other distributions are found through the ``fxforge.passes`` entry-point group, loaded the first
time an unknown name is looked up or the registry is listed; a plugin that fails to load is skipped with a
``PluginWarning`` naming it. The environment variable ``FXFORGE_PLUGINS`` limits which are loaded: ``0`` none,
``name1,name2`` only those entry points; unset (or ``1``) all.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar

from torch import fx

from fxforge.errors import ConfigError, PluginWarning, suggest
from fxforge.graph.result import PassResult

from .context import PassContext
from .text import PassSpec, parse_pipeline

_REGISTRY: dict[str, type[Pass]] = {}
PLUGIN_GROUP = "fxforge.passes"
PLUGINS_ENV = "FXFORGE_PLUGINS"
_plugins = {"loaded": False}  # entry points are read once, lazily (importing plugins costs time)


def _properties(value: str | Collection[str]) -> frozenset[str]:
    """``"eval"`` or ``("eval", "bn-folded")`` -> a frozenset (a lone string is one property, not its letters)."""
    return frozenset({value}) if isinstance(value, str) else frozenset(value)


@dataclass(frozen=True)
class Pass:
    """Base class of every pass: a frozen dataclass whose fields are its options.

    Class attributes: ``name`` (kebab-case, the name in pipeline text), and the graph properties the pass
    ``requires`` before it runs, ``provides`` after it and ``invalidates`` (e.g. ``eval``, ``bn-folded``,
    ``quantized``). ``__call__(gm, ctx)`` rewrites ``gm`` (in place, or returns a new one) and returns a
    ``PassResult``. Register it with ``@register_pass`` to use it by name::

        @fxforge.register_pass
        @dataclass(frozen=True)
        class DropAsserts(fxforge.Pass):
            name = "drop-asserts"
            requires = ("eval",)
            keep_messages: bool = False   # an option: drop-asserts{keep_messages=true}

            def __call__(self, gm, ctx):
                ...
                return fxforge.PassResult(gm, modified=changed)

    Options are bool, int, float or str (pipeline text is converted to the field's type); validate them in
    ``__post_init__`` by raising ValueError.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for attr in ("requires", "provides", "invalidates"):  # tuples, lists or one string are fine too
            setattr(cls, attr, _properties(getattr(cls, attr)))

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


def _is_pass_name(name: object) -> bool:
    """Whether ``name`` reads back from pipeline text as itself (the kebab-case rule is pipeline/text.py's)."""
    try:
        return isinstance(name, str) and parse_pipeline(name) == [PassSpec(name)]
    except ConfigError:
        return False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Register a Pass subclass under its ``name`` (kebab-case, unique)."""
    if not cls.name:
        raise ConfigError(f"{cls.__qualname__} has no `name`; give it a kebab-case name such as 'fold-bn'")
    if not _is_pass_name(cls.name):
        raise ConfigError(f"pass name {cls.name!r} ({cls.__qualname__}) is not kebab-case: pipeline text and "
                          f"dump_dir file names need lowercase words joined by '-', e.g. 'fold-bn'")
    old = _REGISTRY.get(cls.name)
    # Re-defining the same pass (a re-run notebook cell, a reloaded module) replaces it; another one clashes.
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ConfigError(f"a pass named '{cls.name}' is already registered ({old.__module__}.{old.__qualname__}): "
                          f"give yours another name")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    """Every pass by name: built-in, defined in this process, and from installed plugins."""
    load_plugins()
    return dict(_REGISTRY)


def pass_class(name: str) -> type[Pass]:
    if name not in _REGISTRY:
        load_plugins()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigError(f"unknown pass '{name}'.{suggest(name, _REGISTRY)} Known passes: {known}. A pass of "
                          f"your own needs @fxforge.graph_pass(name='{name}') (or @register_pass) to run first, "
                          f"or a '{PLUGIN_GROUP}' entry point in an installed distribution"
                          f"{'' if plugin_allowlist() is None else f' ({PLUGINS_ENV} limits which load)'}")
    return _REGISTRY[name]


def load_plugins(reload: bool = False) -> None:
    """Import the ``fxforge.passes`` entry points once (their passes register themselves on import).

    An entry point names a module (``my_pkg.passes``) or a Pass subclass (``my_pkg.passes:MyPass``, registered
    if it is not yet). A plugin that fails to load is skipped with a PluginWarning naming it.
    """
    if _plugins["loaded"] and not reload:
        return
    _plugins["loaded"] = True  # before loading: a plugin that lists the registry must not recurse
    allowed = plugin_allowlist()
    for ep in entry_points(group=PLUGIN_GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        try:
            obj = ep.load()
            if isinstance(obj, type) and issubclass(obj, Pass) and _REGISTRY.get(obj.name) is not obj:
                register_pass(obj)
        except Exception as exc:  # a broken plugin must not break compiling models that do not use it
            dist = f" from distribution '{ep.dist.name}'" if getattr(ep, "dist", None) else ""
            warnings.warn(f"fxforge pass plugin '{ep.name}' ({ep.value}){dist} failed to load and is skipped: "
                          f"{type(exc).__name__}: {exc}", PluginWarning, stacklevel=2)


def plugin_allowlist() -> frozenset[str] | None:
    """The entry-point names ``FXFORGE_PLUGINS`` allows: None for all (unset, empty or ``1``), empty for
    none (``0``), else the comma-separated names."""
    value = os.environ.get(PLUGINS_ENV, "").strip()
    if value in ("", "1"):
        return None
    if value == "0":
        return frozenset()
    return frozenset(name.strip() for name in value.split(",") if name.strip())


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


def _declared_options(fn: Callable[..., Any], name: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Option name -> default: ``options=`` when given (each must be a parameter of ``fn`` or go to its
    ``**kwargs``), else the keyword parameters after ``gm, ctx``, each with a default."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    if options is None:
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ConfigError(f"pass '{name}': *{p.name} cannot be an option; declare the options with "
                                  f"@graph_pass(name='{name}', options={{'option': default, ...}})")
            if p.default is inspect.Parameter.empty:
                raise ConfigError(f"option '{p.name}' of pass '{name}' needs a default value")
        return {p.name: p.default for p in params}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params)
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key in options:
        if key not in named and not takes_any:
            raise ConfigError(f"pass '{name}' declares option '{key}' but {fn.__qualname__} has no parameter "
                              f"'{key}' (or **options) to receive it")
    for p in params:
        if p.name not in options and p.default is inspect.Parameter.empty and p.kind != p.VAR_KEYWORD:
            raise ConfigError(f"parameter '{p.name}' of pass '{name}' is not in options= and has no default")
    return dict(options)


def graph_pass(
    name: str,
    *,
    requires: str | Collection[str] = (),
    provides: str | Collection[str] = (),
    invalidates: str | Collection[str] = (),
    options: Mapping[str, Any] | None = None,
) -> Callable[[Callable[..., bool | PassResult]], type[Pass]]:
    """Turn ``fn(gm, ctx, **options) -> bool | PassResult`` into a registered pass (the decorated name is
    then the Pass class: ``fn()`` builds an instance, ``fn(opt=...)`` one with options).

    The options are ``options=`` (name -> default) when given, else the keyword parameters after ``gm, ctx``,
    each with a default. An option's type is its default's type (bool, int, float or str)::

        @fxforge.graph_pass(name="drop-asserts", requires=("eval",))
        def drop_asserts(gm, ctx, keep_messages: bool = False) -> bool: ...

        @fxforge.graph_pass(name="scale-output", options={"factor": 1.0})
        def scale_output(gm, ctx, **options) -> bool: ...

    Return True when the graph changed (fxforge then regenerates its code), False when it did not, or a
    PassResult (a new graph module, notes for the report).
    """

    def wrap(fn: Callable[..., bool | PassResult]) -> type[Pass]:
        declared = _declared_options(fn, name, options)
        # An option's type is its default's type: annotations may be strings that cannot be resolved here.
        option_fields = [(key, type(default), field(default=default)) for key, default in declared.items()]

        def __call__(self: Pass, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
            out = fn(gm, ctx, **{key: getattr(self, key) for key in declared})
            if out is None:  # a forgotten `return`: we cannot tell whether the graph changed
                raise ConfigError(f"pass '{name}' ({fn.__qualname__}) returned None: return True when it changed "
                                  f"the graph, False when it did not, or a PassResult")
            return out if isinstance(out, PassResult) else PassResult(gm, bool(out))

        cls = dataclasses.make_dataclass(
            "".join(part.title() for part in name.split("-")) + "Pass",
            option_fields,
            bases=(Pass,),
            frozen=True,
            namespace={
                "name": name,
                "requires": _properties(requires),
                "provides": _properties(provides),
                "invalidates": _properties(invalidates),
                "__call__": __call__,
                "__doc__": fn.__doc__,
            },
        )
        # The function's identity is the pass's identity (errors, re-registration). Set after creation:
        # Python 3.12's make_dataclass stamps the *caller's* module (this file) on the class.
        cls.__module__, cls.__qualname__ = fn.__module__, fn.__qualname__
        return register_pass(cls)

    return wrap
