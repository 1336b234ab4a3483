"""Per-layer quantization control: which observer and weight scheme each layer uses, and what stays fp32.

``QuantConfig`` holds global defaults plus rules by op type, by module name and by regex; the most specific
rule wins (name > regex > type > defaults). Rules are immutable: ``for_type`` / ``for_name`` / ``for_regex``
return a new config, so one base config can be shared::

    cfg = QuantConfig(activation="histogram").for_type(nn.Linear, activation="percentile").for_name(
        "features.0", activation="entropy")

Weight-only quantization reads ``weight_bits`` (8, per output channel; or 4, group-wise) and ``group_size``
(int4: input channels sharing one scale and zero point) from the same rules::

    QuantConfig(weight_bits=4, group_size=64).for_name("lm_head", weight_bits=8)

A node's *layer name* is the module path it belongs to: the called submodule for a module call, else the
innermost module whose forward produced it (``nn_module_stack`` recorded while tracing). Names match a
module and everything inside it, so ``skip=["layer4"]`` keeps all of layer4 in fp32.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import fx, nn

from fxforge.errors import ConfigError, suggest

from .observers import OBSERVERS, Observer, make_observer

ObserverChoice = str | Callable[[], Observer]


WEIGHT_BITS = (4, 8)
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 CPU kernels take
DEFAULT_INT4_GROUP = 128


def _check_weights(bits: int | None, group_size: int | None, what: str) -> None:
    if bits is not None and bits not in WEIGHT_BITS:
        raise ConfigError(f"{what}: weight_bits must be 8 or 4, got {bits!r}")
    if group_size is not None and group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"{what}: group_size must be one of {INT4_GROUP_SIZES} (int4 weights), got {group_size!r}")


def _check_observer(choice: ObserverChoice | None, what: str) -> None:
    if isinstance(choice, str) and choice not in OBSERVERS:
        raise ConfigError(f"{what}: unknown observer '{choice}'.{suggest(choice, OBSERVERS)} "
                          f"Valid: {', '.join(OBSERVERS)}, or a callable returning an fxforge Observer")


@dataclass(frozen=True)
class LayerRule:
    """Overrides for the layers a rule matches (None: keep the less specific setting)."""

    activation: ObserverChoice | None = None
    per_channel: bool | None = None
    weight_bits: int | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        _check_observer(self.activation, "quant_config")
        _check_weights(self.weight_bits, self.group_size, "quant_config rule")


@dataclass(frozen=True)
class LayerQuant:
    """The resolved settings of one layer."""

    activation: ObserverChoice
    per_channel: bool
    weight_bits: int = 8
    group_size: int | None = None  # None: per output channel (int8), DEFAULT_INT4_GROUP (int4)

    @property
    def int4_group(self) -> int:
        return self.group_size or DEFAULT_INT4_GROUP

    def make_observer(self) -> Observer:
        return make_observer(self.activation) if isinstance(self.activation, str) else self.activation()


@dataclass(frozen=True)
class QuantConfig:
    """Global defaults (``activation`` observer, per-channel weights, weight-only ``weight_bits`` and
    ``group_size``) plus per-type/name/regex rules."""

    activation: ObserverChoice = "histogram"
    per_channel: bool = True
    weight_bits: int = 8
    group_size: int | None = None
    by_type: tuple[tuple[type | str, LayerRule], ...] = ()
    by_name: tuple[tuple[str, LayerRule], ...] = ()
    by_regex: tuple[tuple[str, LayerRule], ...] = ()
    # compile warns (raises under verify="numeric") when the int8 output's SQNR against fp32 falls below this
    min_sqnr_db: float = 10.0

    def __post_init__(self) -> None:
        _check_observer(self.activation, "quant_config activation")
        if not isinstance(self.min_sqnr_db, (int, float)) or isinstance(self.min_sqnr_db, bool) \
                or math.isnan(self.min_sqnr_db):
            raise ConfigError(f"quant_config min_sqnr_db={self.min_sqnr_db!r}: give a number of dB "
                              f"(-math.inf turns the check off)")
        _check_weights(self.weight_bits, self.group_size, "quant_config")
        for pattern, _ in self.by_regex:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"quant_config regex {pattern!r} does not compile: {exc}") from None

    def for_type(self, op: type | str, **rule: Any) -> QuantConfig:
        """Rule for an op type: a module class (nn.Linear) or an op kind ("add", "conv", "cat", ...)."""
        return replace(self, by_type=(*self.by_type, (op, LayerRule(**rule))))

    def for_name(self, name: str, **rule: Any) -> QuantConfig:
        return replace(self, by_name=(*self.by_name, (name, LayerRule(**rule))))

    def for_regex(self, pattern: str, **rule: Any) -> QuantConfig:
        return replace(self, by_regex=(*self.by_regex, (pattern, LayerRule(**rule))))

    def resolve(self, layer: str, op_type: type | None, op_kind: str) -> LayerQuant:
        """Settings for the layer named ``layer`` whose op is ``op_type`` (module class) / ``op_kind``."""
        rules = [r for key, r in self.by_type if key in (op_type, op_kind)]
        rules += [r for pattern, r in self.by_regex if re.fullmatch(pattern, layer)]
        rules += [r for name, r in self.by_name if name_matches(name, layer)]
        settings = {"activation": self.activation, "per_channel": self.per_channel,
                    "weight_bits": self.weight_bits, "group_size": self.group_size}
        for rule in rules:  # least specific first: later rules override
            settings.update({k: v for k in settings if (v := getattr(rule, k)) is not None})
        return LayerQuant(**settings)

    @classmethod
    def from_value(cls, value: QuantConfig | Mapping[str, Any] | str | None) -> QuantConfig:
        """Accept a QuantConfig, None, an observer name ("minmax"), or a dict ``{"activation": ...,
        "per_channel": ..., "weight_bits": 4, "group_size": 64, "types": {nn.Linear: {...}}, "names": {"fc": {...}},
        "regex": {"layer1\\..*": {...}}}``."""
        if value is None or isinstance(value, QuantConfig):
            return value or cls()
        if isinstance(value, str):
            return cls(activation=value)
        settings = ("activation", "per_channel", "min_sqnr_db", "weight_bits", "group_size")
        known = {*settings, "types", "names", "regex"}
        unknown = set(value) - known
        if unknown:
            raise ConfigError(f"quant_config has unknown keys {sorted(unknown)}; valid keys: {sorted(known)}")
        cfg = cls(**{k: value[k] for k in settings if k in value})
        for key, method in (("types", cfg.for_type), ("names", cfg.for_name), ("regex", cfg.for_regex)):
            for match, rule in value.get(key, {}).items():
                cfg = getattr(cfg, method.__name__)(match, **rule)
        return cfg


def name_matches(name: str, layer: str) -> bool:
    """``name`` is ``layer`` itself or one of the modules that contain it."""
    return layer == name or layer.startswith(name + ".")


def layer_name(node: fx.Node) -> str:
    """The module path a node belongs to (see the module docstring)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else str(path)


@dataclass
class QuantOptions:
    """Everything a compile knows about quantization (kept in the PassContext)."""

    mode: str = "static"  # "static", "dynamic" or "weight-only"
    backend: str = "x86"
    config: QuantConfig = field(default_factory=QuantConfig)
    skip: tuple[str, ...] = ()
    calibration: Any = None
    calibration_batches: int | None = None
    reduce_range: bool | None = None
    engine: str | None = None  # the quantized engine the lowered graph runs under (None: ``backend``)

    @property
    def runtime_engine(self) -> str:
        return self.engine or self.backend

    def skipped(self, layer: str) -> bool:
        return any(name_matches(name, layer) for name in self.skip)


def check_skip_names(model: nn.Module, skip: str | Sequence[str]) -> tuple[str, ...]:
    """Every ``skip`` entry must name a submodule: a typo would otherwise quantize the layer silently.
    Returns the entries (a single string is one name, not a sequence of one-letter names)."""
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    known = {name for name, _ in model.named_modules() if name}
    for name in skip:
        if name not in known:
            raise ConfigError(f"skip: the model has no submodule '{name}'.{suggest(name, known)} "
                              f"skip takes module paths as printed by model.named_modules()")
    return skip
