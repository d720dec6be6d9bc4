"""Operational endpoints: /v1/stats (JSON) and /metrics (Prometheus text)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from .gate import Gate
from .models import ServedModels


def add_ops_routes(app: FastAPI, served: ServedModels, gate: Gate) -> None:
    @app.get("/v1/stats")
    def stats() -> dict[str, Any]:
        engines = {}
        for name, vl in served.models.items():
            limits = {"max_crops": vl.limits.max_crops or vl.model.cfg.vision.max_crops, "max_pixels": vl.limits.max_pixels}
            engines[name] = vl.engine.stats | {"images": limits}
        responses: dict[str, dict[str, int]] = {}
        for (path, status), n in sorted(gate.responses.items()):
            responses.setdefault(path, {})[str(status)] = n
        return {
            "status": "running",
            "in_flight": gate.in_flight,
            "max_in_flight": gate.max_in_flight,
            "models": engines,
            "responses": responses,
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        s = stats()
        lines = ["# TYPE moonbase_in_flight gauge", f"moonbase_in_flight {s['in_flight']}"]
        lines.append("# TYPE moonbase_responses_total counter")
        for path, by_status in s["responses"].items():
            lines += [f'moonbase_responses_total{{path="{path}",status="{st}"}} {n}' for st, n in by_status.items()]
        for key in ("running", "waiting", "kv_blocks_free", "kv_blocks", "prefix_cache_entries", "prefix_cache_hits", "steps"):
            lines.append(f"# TYPE moonbase_engine_{key} {'counter' if key in ('prefix_cache_hits', 'steps') else 'gauge'}")
            lines += [f'moonbase_engine_{key}{{model="{name}"}} {e[key]}' for name, e in s["models"].items()]
        return "\n".join(lines) + "\n"
