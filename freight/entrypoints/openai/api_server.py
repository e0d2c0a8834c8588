"""The OpenAI-compatible HTTP server: FastAPI app, API-key check, uvicorn with a clean shutdown.

The engine core(s) start in their own processes and the model is loaded before the
port opens (a listening server is a ready server). On SIGTERM/SIGINT the listening
sockets close first and new requests get 503; in-flight requests run to completion
for up to --graceful-shutdown-timeout seconds, then whatever is left is aborted (its
client gets an error, not a cut connection); the engine cores stop and the process
exits 0. If an engine core dies, every request in flight gets an error at once,
/health answers 503, and the server exits 1 a moment later.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import signal
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Optional

import uvicorn
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from freight import __version__
from freight.engine.async_llm import AsyncLLM
from freight.config import parse_size
from freight.entrypoints.chat_template import load_chat_template
from freight.entrypoints.openai.errors import APIError, install_error_handlers
from freight.entrypoints.openai.preprocess import PromptPreparer
from freight.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                 DetokenizeResponse, EmbeddingRequest, ErrorResponse, ModelList,
                                                 TokenizeRequest, TokenizeResponse, VersionResponse)
from freight.entrypoints.openai.chat_reply import ChatParsers
from freight.entrypoints.openai.serving_chat import OpenAIServingChat
from freight.entrypoints.openai.serving_completion import OpenAIServingCompletion
from freight.entrypoints.openai.serving_embedding import OpenAIServingEmbedding
from freight.entrypoints.openai.serving_tokenize import OpenAIServingTokenization
from freight.entrypoints.openai.status_page import PAGE_PATHS, mount_status_page
from freight.metrics import CONTENT_TYPE, ServerMetrics

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "freight-default"  # the served name of the bundled model
# Reachable without the API key: load balancers and Prometheus do not hold it (as in vLLM).
# The status page's HTML holds no data (its /status/* data endpoints need the key).
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/ping"}) | PAGE_PATHS


DEFAULT_MAX_BODY_BYTES = 16 * 1024**2


@dataclass
class ServerSettings:
    served_model_names: list[str]
    model_path: str
    api_key: Optional[str] = None
    trust_request_chat_template: bool = False
    chat_template: Optional[str] = None  # --chat-template, loaded and parsed
    max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    chat_parsers: ChatParsers = field(default_factory=ChatParsers)
    # CORS, as vLLM's flags (and defaults): every origin, method and header, no credentials.
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    root_path: str = ""  # the prefix a path-stripping proxy serves the API under

    @classmethod
    def from_args(cls, args: argparse.Namespace, model_path: str) -> "ServerSettings":
        # As vLLM: the model as given on the command line; the bundled model's path is an
        # install detail, so it gets a stable name instead.
        given = getattr(args, "model_tag", None) or getattr(args, "model", None)
        names = getattr(args, "served_model_name", None) or [given or DEFAULT_MODEL_NAME]
        body = getattr(args, "max_request_body_size", None)
        return cls(served_model_names=list(names), model_path=model_path, api_key=resolve_api_key(args),
                   trust_request_chat_template=bool(getattr(args, "trust_request_chat_template", False)),
                   chat_template=load_chat_template(getattr(args, "chat_template", None)),
                   max_request_body_bytes=parse_size(body) if body is not None else DEFAULT_MAX_BODY_BYTES,
                   chat_parsers=chat_parsers_from_args(args),
                   allowed_origins=list(getattr(args, "allowed_origins", ["*"])),
                   allowed_methods=list(getattr(args, "allowed_methods", ["*"])),
                   allowed_headers=list(getattr(args, "allowed_headers", ["*"])),
                   allow_credentials=bool(getattr(args, "allow_credentials", False)),
                   root_path=getattr(args, "root_path", None) or "")


def chat_parsers_from_args(args: argparse.Namespace) -> ChatParsers:
    from freight.entrypoints.openai.reasoning_parsers import get_reasoning_parser
    from freight.entrypoints.openai.tool_parsers import get_tool_parser

    auto = bool(getattr(args, "enable_auto_tool_choice", False))
    tool_name = getattr(args, "tool_call_parser", None)
    reasoning_name = getattr(args, "reasoning_parser", None)
    if auto and not tool_name:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (hermes, llama3_json, mistral, pythonic)")
    return ChatParsers(tool_parser=get_tool_parser(tool_name) if tool_name else None,
                       reasoning_parser=get_reasoning_parser(reasoning_name) if reasoning_name else None,
                       enable_auto_tool_choice=auto)


def resolve_api_key(args: argparse.Namespace) -> Optional[str]:
    return getattr(args, "api_key", None) or os.environ.get("FREIGHT_API_KEY") or os.environ.get("VLLM_API_KEY")


class APIKeyMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware): it must not get between streams and disconnects."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.strip().partition(b" ")
        # The auth scheme is case-insensitive (RFC 9110); the key is not.
        if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.expected):
            msg = ("Incorrect API key provided." if auth else
                   "You didn't provide an API key. Provide it in an Authorization header: 'Bearer YOUR_KEY'.")
            return await APIError(msg, 401, code="invalid_api_key").response()(scope, receive, send)
        return await self.app(scope, receive, send)


class _BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"The request body is larger than this server's limit of {limit} bytes.")


class BodySizeLimitMiddleware:
    """413 for a body over the limit: at once from Content-Length, or as soon as a chunked body passes it."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            exc = _BodyTooLarge(self.max_bytes)
            return await APIError(exc.detail, 413, code="request_too_large").response()(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)  # FastAPI answers it through the HTTP error handler
            return message

        return await self.app(scope, limited_receive, send)


# Documented on every API route (FastAPI lists only 200 and 422 by itself).
_ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": what} for status, what in (
    (400, "invalid request (the message and 'param' say which field)"), (401, "missing or wrong API key"),
    (404, "unknown model"), (413, "request body too large"), (500, "the engine failed"),
    (503, "overloaded, shutting down or engine stopped (see Retry-After)"))}


def build_app(async_llm: AsyncLLM, args) -> FastAPI:
    """The app around a running AsyncLLM; `args` is the serve Namespace or a ServerSettings."""
    settings = args if isinstance(args, ServerSettings) else ServerSettings.from_args(args, async_llm.config.model)
    names = settings.served_model_names
    metrics = ServerMetrics.for_engine(names[0], async_llm)
    async_llm.output_observers.append(metrics.observe)
    prep = PromptPreparer(async_llm.prep_tokenizer, async_llm.max_model_len, settings.trust_request_chat_template,
                          chat_template=settings.chat_template)
    completion = OpenAIServingCompletion(async_llm, names, prep)
    chat = OpenAIServingChat(async_llm, names, prep, parsers=settings.chat_parsers)
    tokenization = OpenAIServingTokenization(async_llm, names, prep)
    embedding = OpenAIServingEmbedding(async_llm, names, prep)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        async_llm.begin_shutdown()  # idempotent; the owner joins the engine thread
        prep.close()

    app = FastAPI(title="freight", version=__version__, lifespan=lifespan, root_path=settings.root_path)
    app.state.async_llm = async_llm
    app.state.metrics = metrics
    install_error_handlers(app)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    # Added last, so outermost: it answers a browser's preflight (OPTIONS carries no API key) and puts
    # its headers on every response, errors (401, 413) included, so the page can read them.
    app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                       allow_methods=settings.allowed_methods, allow_headers=settings.allowed_headers,
                       allow_credentials=settings.allow_credentials)

    @app.get("/health")
    async def health() -> Response:
        if not async_llm.is_healthy:
            return APIError("the engine has stopped", 503, code="engine_dead").response()
        return Response(status_code=200)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        return await health()

    @app.get("/version")
    async def version() -> VersionResponse:
        return VersionResponse(version=__version__)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    mount_status_page(app, async_llm)  # /, /status, /status/events, /status/snapshot

    @app.get("/v1/models")
    async def models() -> ModelList:
        return tokenization.models(settings.model_path)

    @app.post("/tokenize", responses=_ERROR_RESPONSES)
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        return await tokenization.tokenize(request)

    @app.post("/detokenize", responses=_ERROR_RESPONSES)
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        return await tokenization.detokenize(request)

    @app.post("/v1/completions", responses=_ERROR_RESPONSES)
    async def completions(request: CompletionRequest, raw: Request) -> Response:
        return await completion.create(request, raw)

    @app.post("/v1/chat/completions", responses=_ERROR_RESPONSES)
    async def chat_completions(request: ChatCompletionRequest, raw: Request) -> Response:
        return await chat.create(request, raw)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        """vLLM's: forget the prefix cache of every engine core (behind the API key, like the API)."""
        async_llm.reset_prefix_cache()
        return Response(status_code=200)

    @app.post("/v1/embeddings", responses=_ERROR_RESPONSES)
    async def embeddings(request: EmbeddingRequest, raw: Request) -> Response:
        return await embedding.create(request, raw)

    _document_errors_as_sent(app)
    return app


def _document_errors_as_sent(app: FastAPI) -> None:
    """FastAPI documents a 422 for every body it validates; this server answers those with a 400."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            for operations in schema.get("paths", {}).values():
                for op in operations.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi


class _Server(uvicorn.Server):
    """uvicorn's server, plus: a graceful drain of the engine, exit 0 after a signal, and exit 1
    (after a short linger with /health at 503) when an engine core dies.

    uvicorn re-raises the signal once it has shut down gracefully (so the process dies
    of it); a server that stopped cleanly on request should simply exit 0.
    """

    DEAD_LINGER_S = 1.0  # let error responses flush and health checks see the 503

    def __init__(self, config: uvicorn.Config, async_llm: AsyncLLM, drain_timeout: float):
        super().__init__(config)
        self.async_llm = async_llm
        self.drain_timeout = drain_timeout
        self.engine_died = False
        async_llm.on_dead.append(self._on_engine_dead)

    def _on_engine_dead(self, error: BaseException) -> None:  # on the engine's output thread
        self.engine_died = True
        threading.Timer(self.DEAD_LINGER_S, lambda: setattr(self, "should_exit", True)).start()

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:  # stop accepting before draining, so nothing new slips in
            server.close()
        self.async_llm.stop_accepting()
        deadline = time.monotonic() + self.drain_timeout
        if self.async_llm.num_in_flight:
            logger.info("draining %d in-flight request(s) for up to %.0fs", self.async_llm.num_in_flight,
                        self.drain_timeout)
        while self.async_llm.num_in_flight and time.monotonic() < deadline and not self.force_exit:
            await asyncio.sleep(0.05)
        self.async_llm.begin_shutdown()  # aborts what is left, with an error its client sees
        await super().shutdown(sockets)


def run_server(args: argparse.Namespace) -> int:
    from freight.cli.engine_args import engine_config_from_args

    config = engine_config_from_args(args)
    settings = ServerSettings.from_args(args, config.model)  # bad flags fail before the engine starts
    async_llm = AsyncLLM(config, data_parallel_size=args.data_parallel_size, max_waiting=args.max_waiting_requests,
                         log_stats_interval=args.log_stats_interval, log_requests=not args.disable_log_requests)
    try:
        app = build_app(async_llm, settings)
        server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                                       access_log=not args.disable_uvicorn_access_log,
                                       timeout_graceful_shutdown=args.graceful_shutdown_timeout,
                                       timeout_keep_alive=5, ssl_keyfile=args.ssl_keyfile,
                                       ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs,
                                       ssl_cert_reqs=args.ssl_cert_reqs),
                         async_llm, drain_timeout=args.graceful_shutdown_timeout)
        scheme = "https" if args.ssl_certfile else "http"
        logger.info("serving %s as %s on %s://%s:%d%s%s%s", config.model, ", ".join(settings.served_model_names),
                    scheme, args.host, args.port, settings.root_path,
                    " (API key required)" if settings.api_key else "",
                    f" with {args.data_parallel_size} engine cores" if args.data_parallel_size > 1 else "")
        server.run()
    finally:
        async_llm.shutdown()
    if server.engine_died:
        logger.error("server stopped: the engine died")
        return 1
    logger.info("server stopped")
    return 0 if server.started else 1
