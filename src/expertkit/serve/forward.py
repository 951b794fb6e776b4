"""A routing-only front for any OpenAI-compatible backend (vLLM, LoRAX, another expertkit server).

The front decides which adapter answers (for `auto`, with the library's router) and forwards
the request unchanged except for `model`, which becomes that adapter's library name; the
backend serves the adapters under those names (see `expertkit export vllm`). Responses and
streams come back as the backend sent them, plus the expert in a header (and a body field
for non-streamed JSON).
"""

from __future__ import annotations

import json

import httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse

from expertkit.errors import ExpertkitError
from expertkit.serve.protocol import ChatRequest, CompletionRequest, OpenAIError
from expertkit.serve.service import AUTO, EXPERT_HEADER


class ForwardingService:
    def __init__(self, backend_url: str, adapters: list[str], router=None, pool=None, tokenizer=None,
                 backend_base: str = "base", backend_key: str | None = None, timeout_s: float = 600.0):
        """`adapters`: library adapter names the backend serves; `router`: a CalibratedRouter for `auto`."""
        self.url = backend_url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self.adapters, self.router, self.pool, self.tokenizer = list(adapters), router, pool, tokenizer
        self.backend_base = backend_base
        headers = {"Authorization": f"Bearer {backend_key}"} if backend_key else {}
        self.client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout_s)
        self.forwarded = 0

    def check_backend(self) -> list[str]:
        """The backend's model list, fetched once at start so a wrong URL fails before serving."""
        try:
            reply = httpx.get(f"{self.url}/v1/models", headers=self.client.headers, timeout=10)
            reply.raise_for_status()
            served = [m["id"] for m in reply.json()["data"]]
        except (httpx.HTTPError, KeyError, ValueError) as e:
            raise ExpertkitError(f"backend {self.url} did not answer GET /v1/models ({e}); check --backend") from None
        missing = [a for a in [*self.adapters, self.backend_base] if a not in served]
        if missing:
            raise ExpertkitError(f"backend {self.url} does not serve {missing} (it serves {served}); start it with "
                                 "the command `expertkit export vllm LIBRARY` prints, or fix --backend-base-model")
        return served

    def model_names(self) -> list[str]:
        names = ["base", *self.adapters]
        return names + [AUTO] if self.router else names

    def health(self) -> dict:
        return {"status": "ok", "backend": self.url, "forwarded": self.forwarded}

    def gauges(self) -> dict:
        return {"expertkit_forwarded_requests": ("Requests forwarded to the backend.", self.forwarded)}

    # ------------------------------------------------------------ routing

    def _route(self, prompt_text: str) -> str:
        from expertkit.routing import Prompts

        if not prompt_text.strip():
            raise OpenAIError(400, "cannot route an empty prompt; give some text", param="prompt")
        prompts = Prompts.from_texts(self.tokenizer, [prompt_text])
        return self.router.route(self.pool, prompts).chosen[0]

    def _expert_for(self, model: str, prompt_text) -> str:
        if model == AUTO and self.router:
            return self._route(prompt_text())
        if model in ("base", *self.adapters):
            return model
        if model.startswith("mix:"):
            raise OpenAIError(400, "weighted adapter mixes are served by expertkit's own engine, not when forwarding "
                                   "to vLLM; serve without --forward, or pin the mix as a merge", param="model")
        raise OpenAIError(404, f"model '{model}' does not exist; available: {self.model_names()}",
                          code="model_not_found", param="model")

    async def completion(self, req: CompletionRequest):
        def text():
            prompts = req.prompts()
            if len(prompts) != 1:
                raise OpenAIError(400, "model 'auto' routes one prompt per request; send prompts one at a time",
                                  param="prompt")
            p = prompts[0]
            return p if isinstance(p, str) else self.tokenizer.decode(p)

        return await self._forward("/v1/completions", req, self._expert_for(req.model_name, text))

    async def chat(self, req: ChatRequest):
        def text():
            return "\n".join(m.text() for m in req.messages if m.role == "user")

        return await self._forward("/v1/chat/completions", req, self._expert_for(req.model_name, text))

    # ------------------------------------------------------------ forwarding

    async def _forward(self, path: str, req, expert: str):
        body = req.model_dump(exclude_unset=True)
        body["model"] = self.backend_base if expert == "base" else expert
        headers = {EXPERT_HEADER: expert}
        self.forwarded += 1
        try:
            if not req.stream:
                reply = await self.client.post(path, json=body)
                return _relay_json(reply, expert, headers)
            upstream = await self.client.send(self.client.build_request("POST", path, json=body), stream=True)
        except httpx.HTTPError as e:
            raise OpenAIError(502, f"backend {self.url} failed: {type(e).__name__}: {e}", type_="server_error",
                              code="backend_unavailable") from None
        if upstream.status_code >= 400:
            await upstream.aread()
            await upstream.aclose()
            return _relay_json(upstream, expert, headers)

        async def relay():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()

        return StreamingResponse(relay(), status_code=upstream.status_code, media_type="text/event-stream",
                                 headers=headers)


def _relay_json(reply: httpx.Response, expert: str, headers: dict) -> Response:
    try:
        payload = reply.json()
    except json.JSONDecodeError:
        return Response(reply.content, status_code=reply.status_code, headers=headers,
                        media_type=reply.headers.get("content-type"))
    if reply.status_code < 400 and isinstance(payload, dict):
        payload["expert"] = expert
    return JSONResponse(payload, status_code=reply.status_code, headers=headers)


def build_forwarding_service(library_path, backend_url: str, router_name: str | None, base: str | None,
                             device: str | None, backend_base: str, backend_key: str | None) -> ForwardingService:
    """Read the library's adapters and router; load model weights only if the router needs them."""
    from pathlib import Path

    from expertkit.library import Library
    from expertkit.serve.server import pick_router

    library = Library(library_path)
    entries = library.entries()
    adapters = [e.name for e in entries if e.is_adapter]
    router_entry = pick_router(entries, router_name)
    router = pool = tokenizer = None
    base_path = base or library.base_identity()["name"]
    if router_entry is not None:
        from expertkit.routing import load_router

        router = load_router(library, library.get(router_entry))
        if not Path(base_path).exists():
            raise ExpertkitError(f"the library's base '{base_path}' is not on this machine (its tokenizer is needed "
                                 "to route); pass --base PATH")
        if router.router.needs_model:
            from expertkit.base import load_base
            from expertkit.runtime import ExpertPool

            pool = ExpertPool(load_base(base_path, device), library, names=router.experts)
            tokenizer = pool.tokenizer
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(base_path)
    service = ForwardingService(backend_url, adapters, router, pool, tokenizer, backend_base, backend_key)
    service.check_backend()
    return service
