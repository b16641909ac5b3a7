"""The gateway's FastAPI app and the `sfllm-gateway` command. Handlers are thin: see serving.py."""

import dataclasses
import gc
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import errors, native
from gateway.auth import ApiKeyChecker
from gateway.config import GatewayConfig
from gateway.errors import install_error_handlers
from gateway.metrics import GatewayMetrics
from gateway.openapi import describe_bodies
from gateway.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from gateway.router import Router, make_policy
from gateway.serving import OpenAIServing
from gateway.workers import WorkerPool
from protos.sfllm.logs import configure_logging  # the one JSON-lines log format of every SFLLM service

log = logging.getLogger("sfllm.gateway")

RequestT = TypeVar("RequestT", bound=BaseModel)
_ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", *native.ENDPOINTS}


class _CountRequests:
    """ASGI middleware counting every answered request by endpoint and status, errors included."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = scope["path"] if scope["path"] in _ENDPOINTS else "other"
            self.metrics.requests.labels(path, str(status)).inc()


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 413 past `limit` bytes, 415 when it says it is not JSON, 400 when it is not a JSON object."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type and content_type != "application/json" and not content_type.endswith("+json"):
        raise errors.unsupported_media_type(content_type)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise errors.request_too_large(f"The request body exceeds {limit} bytes.")
    body = bytearray()
    try:
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise errors.request_too_large(f"The request body exceeds {limit} bytes.")
    except ClientDisconnect:  # left while sending its body: nobody to answer, and not our fault
        raise errors.client_closed() from None
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise errors.malformed_json(str(exc)) from None
    if not isinstance(data, dict):
        raise errors.malformed_json("the body must be a JSON object")
    try:
        # JSON escapes can spell unpaired UTF-16 surrogates, which no worker (nor protobuf) can carry
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise errors.bad_request("The request contains an unpaired UTF-16 surrogate (\\ud800-\\udfff).") from None
    return data


def _parse(model: type[RequestT], data: Any) -> RequestT:
    """Validate a request: 400 naming the first bad or unsupported field."""
    try:
        req = model.model_validate(data)
    except ValidationError as exc:
        raise errors.from_validation_error(exc) from None
    unsupported = req.first_unsupported_field()  # type: ignore[attr-defined]
    if unsupported is not None:
        name, message = unsupported
        raise errors.bad_request(message, name, "unsupported_parameter")
    return req


def create_app(config: GatewayConfig) -> FastAPI:
    """The gateway app; its lifespan starts and stops the worker pool."""
    metrics = GatewayMetrics(multiprocess=config.processes > 1)
    policy = make_policy(
        config.policy,
        chunk_chars=config.prefix_chunk_chars,
        max_chars=config.prefix_max_chars,
        load_factor=config.prefix_load_factor,
    )
    router = Router(policy)
    pool = WorkerPool(config, router, metrics)
    serving = OpenAIServing(config, router, pool, metrics)
    keys = ApiKeyChecker(config.api_keys)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await pool.start()
        # Start-up's objects out of the collector's reach: a full collection over them stalls every stream.
        gc.collect()
        gc.freeze()
        log.info("gateway started", extra={"fields": {"policy": config.policy, "workers": sorted(router.workers)}})
        yield
        await pool.stop()
        metrics.close()

    app = FastAPI(title="SFLLM gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.config = config
    app.state.router = router
    app.state.pool = pool
    app.state.metrics = metrics
    app.state.serving = serving
    install_error_handlers(app)
    app.add_middleware(_CountRequests, metrics=metrics)

    async def require_key(request: Request) -> None:
        if not keys.allows(request.headers.get("authorization")):
            raise errors.unauthorized()

    authorized = [Depends(require_key)]

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(request: Request) -> Response:
        req = _parse(ChatCompletionRequest, await _read_json(request, config.max_request_bytes))
        return await serving.chat(req, request)

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(request: Request) -> Response:
        req = _parse(CompletionRequest, await _read_json(request, config.max_request_bytes))
        return await serving.completion(req, request)

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> ModelList:
        return serving.models()

    @app.get("/v1/models/{model_id:path}", dependencies=authorized)
    async def model(model_id: str) -> ModelCard:
        return serving.model(model_id)

    native.register(app, serving, authorized, _read_json)  # SGLang's native API: /generate and friends
    describe_bodies(app)  # /openapi.json: the bodies these handlers read themselves, and the error body

    @app.get("/health")
    async def health() -> JSONResponse:
        healthy = router.healthy_workers()
        if not healthy:
            return errors.no_healthy_worker().response()
        return JSONResponse({"status": "ok", "healthy_workers": len(healthy), "workers": len(router.workers)})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


# How `main` hands its configuration to the processes uvicorn starts (each builds its own app from it).
_CHILD_CONFIG_ENV = "SFLLM_GATEWAY_CHILD_CONFIG"


def child_app() -> FastAPI:
    """The app of one of several gateway processes (uvicorn's factory); its config comes from `main`."""
    config = GatewayConfig(**json.loads(os.environ[_CHILD_CONFIG_ENV]))
    configure_logging(config.log_level)
    return create_app(config)


def main(argv: Sequence[str] | None = None) -> None:
    """The `sfllm-gateway` command: one process, or --processes of them sharing the port."""
    config = GatewayConfig.from_args(argv)
    configure_logging(config.log_level)
    server = {
        "host": config.host,
        "port": config.port,
        "log_level": config.log_level,
        "log_config": None,  # keep the JSON handler configure_logging installed
        "access_log": False,  # the gateway logs one structured line per request itself
        "timeout_graceful_shutdown": 30,  # SIGTERM: stop accepting, let in-flight streams finish
        "loop": "uvloop",
        "http": "httptools",
    }
    # uvicorn re-raises the SIGTERM it handled once its graceful shutdown is over; with the default
    # handler that would end the process "killed by SIGTERM" after a clean drain. Exit 0 instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if config.processes == 1:
        uvicorn.run(create_app(config), **server)
        return
    # Several processes: each has its own router and worker pool; their metrics meet in one folder.
    metrics_dir = tempfile.mkdtemp(prefix="sfllm-gateway-metrics-")
    os.environ[GatewayMetrics.MULTIPROCESS_DIR_ENV] = metrics_dir
    os.environ[_CHILD_CONFIG_ENV] = json.dumps(dataclasses.asdict(config))
    try:
        uvicorn.run("gateway.app:child_app", factory=True, workers=config.processes, **server)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
