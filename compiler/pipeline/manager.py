"""PassManager: runs a pipeline of passes with requirement checks, verification and instruments.

Failures name the pass and the passes that ran before it (as torch.fx's pass infra does), so a user can
reproduce with ``pipeline=`` the prefix that ran. A requirement that does not hold names both the pass that
needs it and the pass that invalidated it (or the passes that would provide it); ``check`` finds these
before anything runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import fx

from fxforge.errors import CompileError, PassError

from .context import PassContext
from .instruments import Instrument
from .pass_api import Pass, PassResult, instantiate, registered_passes
from .text import format_pipeline, parse_pipeline
from .verify import verify_graph

log = logging.getLogger(__name__)


def _providers(prop: str) -> list[str]:
    return sorted(name for name, cls in registered_passes().items() if prop in cls.provides)


@dataclass
class PropertyFlow:
    """The graph properties that hold, and which pass last provided or invalidated each one."""

    holds: set[str]
    provided_by: dict[str, str] = field(default_factory=dict)
    invalidated_by: dict[str, str] = field(default_factory=dict)

    def apply(self, p: Pass) -> None:
        for prop in p.invalidates & self.holds - p.provides:
            self.invalidated_by[prop] = p.name
        for prop in p.provides:
            self.provided_by[prop] = p.name
            self.invalidated_by.pop(prop, None)
        self.holds = (self.holds - p.invalidates) | p.provides

    def why_missing(self, prop: str) -> str:
        providers = ", ".join(_providers(prop)) or "no registered pass"
        if prop in self.invalidated_by:
            after = f" (it held after '{self.provided_by[prop]}')" if prop in self.provided_by else ""
            return (f"'{prop}' was invalidated by '{self.invalidated_by[prop]}'{after}; it is provided by "
                    f"{providers}: run one of them after '{self.invalidated_by[prop]}'")
        return f"'{prop}' is provided by {providers}, and no such pass ran before it"


def _log_pass(p: Pass, result: PassResult, nodes_before: int, seconds: float) -> None:
    """One INFO line per pass (name, time, nodes before -> after), its notes at DEBUG."""
    log.info("pass %s: %.1f ms, %d -> %d nodes%s", p.spec(), seconds * 1e3, nodes_before, len(result.gm.graph.nodes),
             "" if result.modified else " (unchanged)")
    if log.isEnabledFor(logging.DEBUG):
        for note in result.notes:
            log.debug("pass %s: %s", p.name, note)
        for rule, count in result.matches.items():
            log.debug("pass %s: rule %s matched %d time(s)", p.name, rule, count)


class PassManager:
    """Run ``passes`` in order over a GraphModule, verifying the graph after each one unless ``verify=False``."""

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Instrument] = (), verify: bool = True) -> None:
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.verify = verify

    @classmethod
    def from_text(cls, text: str, **kwargs) -> PassManager:
        return cls([instantiate(spec) for spec in parse_pipeline(text)], **kwargs)

    @property
    def pipeline(self) -> str:
        return format_pipeline([p.spec() for p in self.passes])

    def check(self, properties: set[str]) -> None:
        """Raise the PassError ``run`` would raise for a requirement that does not hold, without running
        anything (``properties``: what holds before the first pass, e.g. ``{"eval"}``)."""
        flow, ran = PropertyFlow(set(properties)), []
        for p in self.passes:
            self._check_requires(p, flow, ran)
            flow.apply(p)
            ran.append(str(p.spec()))

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        ran: list[str] = []
        flow = PropertyFlow(set(ctx.properties))
        for p in self.passes:
            self._check_requires(p, flow, ran)
            for inst in self.instruments:
                inst.before_pass(p, gm, ctx)
            ctx.current_pass = p.name
            nodes_before, start = len(gm.graph.nodes), time.perf_counter()
            result = self._run_one(p, gm, ctx, ran)
            _log_pass(p, result, nodes_before, time.perf_counter() - start)
            flow.apply(p)
            ctx.properties = set(flow.holds)
            for inst in self.instruments:
                inst.after_pass(p, result, ctx, ran)
            if self.verify:  # after the instruments, so that pass timings do not include verification
                self._verify(p, result.gm, ctx, ran)
            ran.append(str(p.spec()))
            gm = result.gm
        return gm

    @staticmethod
    def _check_requires(p: Pass, flow: PropertyFlow, ran: list[str]) -> None:
        missing = sorted(p.requires - flow.holds)
        if not missing:
            return
        hints = "; ".join(flow.why_missing(m) for m in missing)
        raise PassError(
            f"pass '{p.name}' requires {missing} which do not hold after [{', '.join(ran) or 'nothing'}]: {hints}. "
            f"Put a providing pass before '{p.name}' in the pipeline (and after any pass that invalidates it).",
            pass_name=p.name, ran_before=list(ran),
        )

    @staticmethod
    def _run_one(p: Pass, gm: fx.GraphModule, ctx: PassContext, ran: list[str]) -> PassResult:
        try:
            result = p(gm, ctx)
        except CompileError:
            raise
        except Exception as exc:
            raise PassError(
                f"pass '{p.spec()}' failed with {type(exc).__name__}: {exc}. "
                f"Passes run before it: {', '.join(ran) or 'none'}. Drop it from the pipeline to work around.",
                pass_name=p.name, ran_before=list(ran),
            ) from exc
        if not isinstance(result, PassResult):
            raise PassError(f"pass '{p.name}' returned {type(result).__name__}, expected PassResult: return "
                            f"PassResult(gm, modified) from a Pass, or a bool from a @graph_pass function",
                            pass_name=p.name, ran_before=list(ran))
        result.notes.extend(ctx.take_notes())
        if result.modified:
            try:  # torch.fx does not regenerate forward() when the graph is edited
                result.gm.recompile()
            except Exception as exc:
                raise PassError(f"pass '{p.spec()}' left a graph that does not generate code: {exc}. Passes run "
                                f"before it: {', '.join(ran) or 'none'}.", pass_name=p.name, ran_before=list(ran)
                                ) from exc
        return result

    @staticmethod
    def _verify(p: Pass, gm: fx.GraphModule, ctx: PassContext, ran: list[str]) -> None:
        problems = verify_graph(gm, ctx.properties)
        if problems:
            raise PassError(
                f"pass '{p.spec()}' left a graph that does not verify: {'; '.join(problems)}. "
                f"Passes run before it: {', '.join(ran) or 'none'}. This is a bug in that pass: drop it from the "
                f"pipeline (pipeline=...) to work around, and report it with the model.",
                pass_name=p.name, ran_before=list(ran),
            )
