"""What :func:`mmfast.patch` did to a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class PatchReport:
    """``swapped``: (qualified module name, kind) of every module whose behaviour now runs through
    mmfast ("" is the model itself); ``left_alone``: (qualified name, reason) of everything mmfast
    recognised as a candidate but did not touch; ``notes``: global remarks (e.g. the attention
    implementation switch). ``print(report)`` shows a table."""

    model: str
    backend: str
    swapped: List[tuple] = field(default_factory=list)
    left_alone: List[tuple] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def add(self, name: str, kind: str) -> None:
        self.swapped.append((name or "<model>", kind))

    def skip(self, name: str, reason: str) -> None:
        self.left_alone.append((name or "<model>", reason))

    def kinds(self) -> dict:
        """Number of swapped modules per kind."""
        out: dict = {}
        for _, kind in self.swapped:
            out[kind] = out.get(kind, 0) + 1
        return out

    def __bool__(self) -> bool:
        return bool(self.swapped)

    def __str__(self) -> str:
        lines = [f"mmfast.patch({self.model}, backend={self.backend!r}): "
                 f"{len(self.swapped)} swapped, {len(self.left_alone)} left alone"]

        def table(title, rows, head):
            if not rows:
                return
            w = min(max(len(head[0]), *(len(r[0]) for r in rows)), 60)
            lines.append("")
            lines.append(title)
            lines.append(f"  {head[0]:<{w}}  {head[1]}")
            lines.append(f"  {'-' * w}  {'-' * len(head[1])}")
            for name, what in rows:
                lines.append(f"  {name:<{w}}  {what}")

        table("swapped", self.swapped, ("module", "kind"))
        table("left alone", self.left_alone, ("module", "reason"))
        if self.notes:
            lines.append("")
            lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle):  # IPython/Jupyter show the table
        p.text(str(self))
