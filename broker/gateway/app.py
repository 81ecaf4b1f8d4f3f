"""The gateway's aiohttp application: the route table's handlers, errors as problem
documents, the OpenAPI document, and the page at ``/`` when it is installed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
import structlog
from aiohttp import web

from laneway.broker.gateway.openapi import openapi_document
from laneway.broker.gateway.problems import error_response, problem_body, problem_response
from laneway.broker.gateway.routes import ROUTES, aiohttp_path
from laneway.broker.gateway.state import BACKEND, Backend, GatewaySettings
from laneway.errors import ApiError

__all__ = ["GatewaySettings", "create_app"]

log = structlog.get_logger("laneway.gateway")

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _problems(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Every error as ``application/problem+json``: the broker's, the router's (no such
    path: 404, wrong method: 405) and the unexpected (500, logged)."""
    try:
        return await handler(request)
    except ApiError as err:
        return error_response(err)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        headers = {"Allow": err.headers["Allow"]} if "Allow" in err.headers else None
        return problem_response(problem_body(err.status, err.reason or "error"), headers=headers)
    except Exception:
        log.exception("gateway handler failed", path=request.path)
        return problem_response(problem_body(500, "internal error in the gateway"))


def create_app(
    channel: grpc.aio.Channel, settings: GatewaySettings | None = None, *, tls: bool = False
) -> web.Application:
    """The gateway in front of the broker at the other end of ``channel`` (which the
    caller owns and closes); ``tls``: whether that channel uses TLS (for error words)."""
    settings = settings or GatewaySettings()
    app = web.Application(middlewares=[_problems], client_max_size=4 * 1024 * 1024)
    app[BACKEND] = Backend.on(channel, settings, tls=tls)
    for route in ROUTES:
        app.router.add_route(route.method, aiohttp_path(route.path), route.handler, name=route.operation_id)
    document = openapi_document()

    async def openapi(_request: web.Request) -> web.Response:
        return web.json_response(document)

    app.router.add_get("/openapi.json", openapi, name="openapi")
    static = settings.static_dir
    if static is not None and (static / "index.html").is_file():
        index = static / "index.html"

        async def page(_request: web.Request) -> web.FileResponse:
            return web.FileResponse(index)

        app.router.add_get("/", page, name="page")
        app.router.add_static("/static/", static, name="static")
    return app
