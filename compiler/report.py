"""CompileReport: what was done to the model, how long it took, and what it cost in accuracy."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class PassRecord:
    name: str
    spec: str
    seconds: float
    nodes_before: int
    nodes_after: int
    modified: bool
    notes: list[str] = field(default_factory=list)


@dataclass
class CompileReport:
    target: str
    pipeline: str
    torch_version: str
    passes: list[PassRecord] = field(default_factory=list)
    leaf_modules: dict[str, str] = field(default_factory=dict)
    bound_arguments: dict[str, str] = field(default_factory=dict)
    trace_seconds: float = 0.0
    compile_seconds: float = 0.0
    max_abs_error: float | None = None
    max_rel_error: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"fxforge compile report: target={self.target}  torch={self.torch_version}",
            f"pipeline: {self.pipeline}",
            f"trace {self.trace_seconds * 1e3:.1f} ms, total compile {self.compile_seconds * 1e3:.1f} ms",
        ]
        if self.max_rel_error is not None:
            lines.append(f"output vs eager on example inputs: max abs err {self.max_abs_error:.3g}, "
                         f"relative {self.max_rel_error:.3g}")
        for path, why in self.leaf_modules.items():
            lines.append(f"kept as a leaf (not traced into): {path or '<root>'}: {why}")
        for name, value in self.bound_arguments.items():
            lines.append(f"forward argument fixed while tracing (default or concrete_args): {name}={value}")
        lines.append(f"{'pass':<28}{'ms':>9}{'nodes':>15}  changed")
        for r in self.passes:
            nodes = f"{r.nodes_before}->{r.nodes_after}"
            lines.append(f"{r.spec:<28}{r.seconds * 1e3:>9.2f}{nodes:>15}  {'yes' if r.modified else 'no'}")
            lines.extend(f"    - {n}" for n in r.notes)
        return "\n".join(lines)

    def save(self, directory: str | Path) -> Path:
        """Write report.txt and report.json into ``directory``; returns the directory."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.txt").write_text(str(self) + "\n")
        (out / "report.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return out
