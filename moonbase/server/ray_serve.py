"""`moonbase serve --ray`: the same HTTP API as a Ray Serve application, one model and engine per replica.

Ray Serve's proxy spreads requests over the replicas (each batches its own concurrent requests); the routes,
errors and streaming are the single-process server's, since each replica builds the same ASGI app. The
tuning API is not served here: a finetune trains in one process, and replicas do not share one."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ..device import ray_copies
from ..errors import SettingsError
from .app import ServerConfig, create_app
from .models import ServedModels


def app_builder(model: str | None, engine: dict[str, Any], cfg: ServerConfig) -> Callable[[], Any]:
    """What each replica runs when it starts: load the model, build the app."""

    def build() -> Any:
        import moonbase

        vl = moonbase.vl(model, **engine)
        return create_app(ServedModels({vl.model.name: vl}, vl.model.name), cfg)

    return build


def serve_ray(
    model: str | None,
    engine: dict[str, Any],
    cfg: ServerConfig,
    host: str,
    port: int,
    replicas: int | None = None,
    address: str | None = None,
    blocking: bool = True,
) -> None:
    """Deploy on the Ray cluster at `address` (a local instance when None): `replicas` copies (default: one
    per GPU, else one), each holding one GPU when the cluster has them, else its share of the cores."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise SettingsError("serve --ray needs Ray Serve: pip install 'moonbase[ray]'") from e
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False)
    replicas, resources = ray_copies(ray, replicas)
    serve.start(http_options={"host": host, "port": port})
    deployment = serve.deployment(
        serve.ingress(app_builder(model, engine, cfg))(),
        name="moonbase",
        num_replicas=replicas,
        ray_actor_options=resources,
    )
    print(f"moonbase on Ray Serve: {replicas} replica(s) on http://{host}:{port}/v1", file=sys.stderr)
    serve.run(deployment.bind(), name="moonbase", route_prefix="/", blocking=blocking)
