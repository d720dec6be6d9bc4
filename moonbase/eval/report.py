"""A table of numerical checks: max abs / relative error against a tolerance, or exact equality."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_REL_TOL = 1e-4


@dataclass
class Row:
    group: str
    name: str
    ok: bool
    max_abs: float | None = None
    rel: float | None = None
    tol: str = ""
    note: str = ""
    informational: bool = False


class Report:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def close(
        self, group: str, name: str, ours: Any, ref: Any, rel_tol: float | None = DEFAULT_REL_TOL, abs_tol: float | None = None
    ) -> None:
        ours_t = torch.as_tensor(ours, dtype=torch.float64).flatten()
        ref_t = torch.as_tensor(ref, dtype=torch.float64).flatten()
        if ours_t.shape != ref_t.shape:
            self.rows.append(Row(group, name, False, note=f"shape {tuple(ours_t.shape)} vs {tuple(ref_t.shape)}"))
            return
        max_abs = float((ours_t - ref_t).abs().max()) if len(ref_t) else 0.0
        rel = max_abs / max(float(ref_t.abs().max()), 1e-30) if len(ref_t) else 0.0
        ok = (rel_tol is None or rel <= rel_tol) and (abs_tol is None or max_abs <= abs_tol)
        tol = f"rel {rel_tol:g}" if rel_tol is not None else f"abs {abs_tol:g}"
        self.rows.append(Row(group, name, ok, max_abs, rel, tol))

    def exact(self, group: str, name: str, ours: Any, ref: Any, informational: bool = False, note: str = "") -> None:
        ok = ours == ref
        if not ok and not note:
            note = f"got {short_json(ours)}, expected {short_json(ref)}"
        self.rows.append(Row(group, name, ok, tol="exact", note=note, informational=informational))

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if not r.ok and not r.informational]

    def table(self) -> str:
        lines = [f"{'group':<22} {'check':<34} {'max|d|':>10} {'rel':>10} {'tol':>12}  status"]
        for r in self.rows:
            status = "ok" if r.ok else ("info" if r.informational else "FAIL")
            num = lambda v: f"{v:10.3g}" if v is not None else " " * 10  # noqa: E731
            note = f"  ({r.note})" if r.note else ""
            lines.append(f"{r.group:<22} {r.name:<34} {num(r.max_abs)} {num(r.rel)} {r.tol:>12}  {status}{note}")
        worst = max((r for r in self.rows if r.rel is not None), key=lambda r: r.rel, default=None)
        lines.append(
            f"\n{len(self.rows)} checks, {len(self.failures)} failed"
            + (f"; largest relative error {worst.rel:.3g} ({worst.group} {worst.name})" if worst else "")
        )
        return "\n".join(lines)


def short_json(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) < 120 else s[:117] + "..."


def same_result(a: Any, b: Any, tol: float = 1e-12) -> bool:
    """Results compare exactly for strings and ints, floats to `tol` (tuples and lists are the same)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_result(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_result(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= tol
    return a == b
