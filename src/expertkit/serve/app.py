"""The HTTP surface: OpenAI-compatible routes, API-key check, body-size limit, errors in the OpenAI shape.

Every user mistake is a 4xx with {"error": {...}}: malformed JSON, wrong types and unknown
fields are 400, an unknown model 404, a missing or wrong key 401, a full queue 429, an
oversized body 413. The same app fronts the local engine or a remote backend (forward.py):
both services answer `completion`, `chat`, `model_names`, `health` and `gauges`.
"""

from __future__ import annotations

import logging
import secrets
import time
import traceback

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from expertkit.serve.metrics import Metrics
from expertkit.serve.protocol import ChatRequest, CompletionRequest, DetokenizeRequest, OpenAIError, TokenizeRequest
from expertkit.serve.tokenization import detokenize, tokenize, tokenizer_info

MAX_BODY_BYTES = 4 * 1024 * 1024
log = logging.getLogger("expertkit.serve")


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes before they are buffered whole (413)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _send_error(send, OpenAIError(413, f"request body over {self.limit} bytes"))
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # FastAPI passes HTTPException through its body parsing untouched
                raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        return await self.app(scope, counted, send)


async def _send_error(send, error: OpenAIError) -> None:
    response = JSONResponse(error.body(), status_code=error.status)
    await response({"type": "http"}, None, send)


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    """400 naming what is wrong; `param` is the first offending field (None when the body itself is)."""
    parts, fields = [], []
    for err in exc.errors()[:3]:
        loc = [x for x in err.get("loc", ()) if x != "body"]
        parts.append(f"{'.'.join(str(x) for x in loc) or 'body'}: {err.get('msg', 'invalid')}")
        if loc and isinstance(loc[0], str) and err.get("type") != "json_invalid":
            fields.append(loc[0])
    return OpenAIError(400, "invalid request: " + "; ".join(parts), param=fields[0] if fields else None)


def bearer_check(key: str | None, what: str = "API key"):
    """A dependency that refuses a request without `Authorization: Bearer KEY` (none needed when key is None)."""

    def check(request: Request) -> None:
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise OpenAIError(401, f"missing {what}: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not secrets.compare_digest(given.strip().encode(), key.encode()):
            raise OpenAIError(401, f"incorrect {what}", code="invalid_api_key")

    return check


def create_app(service, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               admin_key: str | None = None) -> FastAPI:
    """`admin_key` guards POST /v1/library/reload; without one, reloading over HTTP is off (403)."""
    app = FastAPI(title="expertkit", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics()
    app.state.service, app.state.metrics = service, metrics
    check_key = bearer_check(api_key)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return JSONResponse(_validation_error(exc).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(OpenAIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # a bug, not the client's fault: still an answer in the shape clients parse
            log.error("request %s %s failed:\n%s", request.method, request.url.path, traceback.format_exc())
            error = OpenAIError(500, "internal server error; see the server log", type_="server_error")
            response = JSONResponse(error.body(), status_code=500)
        if request.url.path.startswith("/v1/"):
            elapsed = time.perf_counter() - start if response.status_code < 400 else None
            model = getattr(request.state, "model", "-")
            served = model == "-" or model in service.model_names()  # a client's junk must not become a label
            metrics.observe(request.url.path, model if served else "unknown", response.status_code, elapsed)
        return response

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(service.gauges()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        created = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "expertkit"} for name in service.model_names()]}

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(req: CompletionRequest, request: Request):
        request.state.model = req.model
        return await service.completion(req)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(req: ChatRequest, request: Request):
        request.state.model = req.model
        return await service.chat(req)

    tokenizer = getattr(service, "tokenizer", None)
    if tokenizer is not None:
        _tokenizer_routes(app, service, tokenizer, check_key)
    if hasattr(service, "reload_library"):
        _reload_route(app, service, admin_key)
    if max_body_bytes:
        app.add_middleware(BodyLimit, limit=max_body_bytes)
    return app


def _reload_route(app: FastAPI, service, admin_key: str | None) -> None:
    """POST /v1/library/reload: what the library holds now becomes what is served (admin key only)."""
    check_admin = bearer_check(admin_key, "admin key")

    def admin_only(request: Request) -> None:
        if admin_key is None:
            raise OpenAIError(403, "reloading the library over HTTP is off: start the server with --admin-key (or "
                                   "EXPERTKIT_ADMIN_KEY), or with --watch-s SECONDS", code="reload_disabled")
        check_admin(request)

    @app.post("/v1/library/reload", dependencies=[Depends(admin_only)])
    async def reload_library():
        return await service.reload_library()


def _tokenizer_routes(app: FastAPI, service, tokenizer, check_key) -> None:
    """vLLM's /tokenize, /detokenize and /tokenizer_info: every served model shares the base's tokenizer."""

    def check_model(model: str | None) -> None:
        if model is not None and model not in service.model_names() and not model.startswith("mix:"):
            raise OpenAIError(404, f"model '{model}' does not exist; available: {service.model_names()}",
                              code="model_not_found", param="model")

    @app.post("/tokenize", dependencies=[Depends(check_key)])
    async def tokenize_route(req: TokenizeRequest):
        check_model(req.model)
        return tokenize(tokenizer, getattr(service, "context_length", None), req)

    @app.post("/detokenize", dependencies=[Depends(check_key)])
    async def detokenize_route(req: DetokenizeRequest):
        check_model(req.model)
        return detokenize(tokenizer, req)

    @app.get("/tokenizer_info", dependencies=[Depends(check_key)])
    async def tokenizer_info_route():
        return tokenizer_info(tokenizer)
