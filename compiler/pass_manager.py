"""PassManager: runs a pipeline of passes with requirement checks, verification and instruments.

Failures name the pass and the passes that ran before it (as torch.fx's pass infra does), so a user can
reproduce with ``pipeline=`` the prefix that ran.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx

from .context import PassContext
from .errors import CompileError, PassError
from .instruments import Instrument
from .pass_api import Pass, PassResult, instantiate, registered_passes
from .pipeline import format_pipeline, parse_pipeline
from .verify import verify_graph


def _providers(prop: str) -> list[str]:
    return sorted(name for name, cls in registered_passes().items() if prop in cls.provides)


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

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        ran: list[str] = []
        for p in self.passes:
            self._check_requires(p, ctx, ran)
            for inst in self.instruments:
                inst.before_pass(p, gm, ctx)
            result = self._run_one(p, gm, ctx, ran)
            ctx.properties = (ctx.properties - p.invalidates) | p.provides
            for inst in self.instruments:
                inst.after_pass(p, result, ctx, ran)
            if self.verify:  # after the instruments, so that pass timings do not include verification
                self._verify(p, result.gm, ctx, ran)
            ran.append(str(p.spec()))
            gm = result.gm
        return gm

    @staticmethod
    def _check_requires(p: Pass, ctx: PassContext, ran: list[str]) -> None:
        missing = sorted(p.requires - ctx.properties)
        if not missing:
            return
        hints = "; ".join(f"'{m}' is provided by {', '.join(_providers(m)) or 'no registered pass'}" for m in missing)
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
