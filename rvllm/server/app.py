"""The aiohttp application: routes, OpenAI-shaped errors, auth, and the serve() lifecycle.

Talks to the engine only through rvllm.engine.client.AsyncEngineClient (never numpy or the runner).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import time

from aiohttp import web

import rvllm
from rvllm.server import protocol as P
from rvllm.server.metrics import Metrics, refresh_periodically
from rvllm.server.openai_chat import create_chat_completion, render_chat
from rvllm.server.openai_common import SERVING, Serving, json_response
from rvllm.server.openai_completions import create_completion

logger = logging.getLogger("rvllm.server")

MAX_BODY_BYTES = 32 * 1024 * 1024  # far above any prompt that fits a context window; stops runaway uploads
SHUTDOWN_TIMEOUT_S = 30.0  # SIGTERM: how long in-flight requests may take to finish


def _error_response(err: P.APIError) -> web.Response:
    return web.Response(body=P.error_body(err), status=err.status, content_type="application/json",
                        headers=err.headers)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    """Every error leaves as {"error": {...}}: ours, aiohttp's (404, 405, 413) and unexpected ones."""
    try:
        return await handler(request)
    except P.APIError as e:
        return _error_response(e)
    except web.HTTPRequestEntityTooLarge:
        limit = request.client_max_size
        return _error_response(P.APIError(f"Request body too large: the limit is {limit} bytes.", 413))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status == 404:
            msg = f"Not found: {request.method} {request.path}"
        elif e.status == 405:
            msg = f"Method {request.method} not allowed for {request.path}"
        else:
            msg = e.reason
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        return _error_response(P.APIError(msg, e.status, headers=allow))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        logger.exception("Unhandled error in %s %s", request.method, request.path)
        return _error_response(P.APIError("Internal server error.", 500))


def _auth_middleware(api_key: str):
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def auth(request: web.Request, handler):
        if request.path.startswith("/v1/"):
            got = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(got, expected):
                raise P.APIError("Unauthorized: a valid API key is required.", 401)
        return await handler(request)

    return auth


def _served_names(config) -> list[str]:
    names = getattr(config, "served_model_name", None)
    if isinstance(names, str):
        names = [names]
    return list(names) if names else [config.model_name()]


METRICS = web.AppKey("metrics", Metrics)
CREATED = web.AppKey("created", int)


def build_app(client, max_body_bytes: int = MAX_BODY_BYTES) -> web.Application:
    config = client.config
    api_key = getattr(config, "api_key", None) or os.environ.get("RVLLM_API_KEY")
    middlewares = [errors_middleware] + ([_auth_middleware(api_key)] if api_key else [])
    app = web.Application(middlewares=middlewares, client_max_size=max_body_bytes)
    # --chat-template is already the tokenizer's template (tokenizer_loader); requests may override it.
    serving = Serving(client, _served_names(config))
    app[SERVING] = serving
    app[METRICS] = Metrics(serving.model_name, serving.max_model_len)
    app[CREATED] = int(time.time())
    app.router.add_post("/v1/completions", create_completion)
    app.router.add_post("/v1/chat/completions", create_chat_completion)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/version", version)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    return app


async def list_models(request: web.Request) -> web.Response:
    serving: Serving = request.app[SERVING]
    root = str(serving.client.config.model)
    return json_response(P.ModelList(data=[
        P.ModelCard(id=name, created=request.app[CREATED], root=root, max_model_len=serving.max_model_len)
        for name in serving.served_model_names]))


async def health(request: web.Request) -> web.Response:
    ok = request.app[SERVING].client.is_healthy
    return web.Response(status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    m: Metrics = request.app[METRICS]
    await m.refresh(request.app[SERVING].client)
    body, content_type = m.exposition()
    # The Prometheus content type carries parameters (version, charset), which content_type= rejects.
    return web.Response(body=body, headers={"Content-Type": content_type})


async def version(request: web.Request) -> web.Response:
    return json_response({"version": rvllm.__version__})


async def tokenize(request: web.Request) -> web.Response:
    serving: Serving = request.app[SERVING]
    req: P.TokenizeRequest = P.decode_request(await request.read(), P.TokenizeRequest)
    serving.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise P.APIError("Give exactly one of `prompt` or `messages`.", param="prompt")
    if req.messages is not None:
        text = render_chat(serving, req.messages, add_generation_prompt=req.add_generation_prompt,
                           continue_final_message=req.continue_final_message, chat_template=req.chat_template)
        add_special = bool(req.add_special_tokens)
    else:
        text, add_special = req.prompt, req.add_special_tokens is not False
    ids = serving.tokenizer.encode(text, add_special_tokens=add_special)
    strs = [serving.tokenizer.decode([t], skip_special_tokens=False) for t in ids] if req.return_token_strs else None
    return json_response(P.TokenizeResponse(count=len(ids), max_model_len=serving.max_model_len, tokens=ids,
                                            token_strs=strs))


async def detokenize(request: web.Request) -> web.Response:
    serving: Serving = request.app[SERVING]
    req: P.DetokenizeRequest = P.decode_request(await request.read(), P.DetokenizeRequest)
    serving.check_model(req.model)
    if any(not 0 <= t < serving.vocab_size for t in req.tokens):
        raise P.APIError("tokens has a token id out of vocabulary.", param="tokens")
    return json_response(P.DetokenizeResponse(prompt=serving.tokenizer.decode(req.tokens)))


# ---- serve -------------------------------------------------------------------------------------
def serve(config) -> int:
    """`rvllm serve`: run the server until SIGINT/SIGTERM (exit code 0) or the engine dies (1)."""
    return asyncio.run(serve_async(config))


async def serve_async(config) -> int:
    from rvllm.engine.client import AsyncEngineClient

    t0 = time.perf_counter()
    logger.info("Starting the engine for %s", config.model or "the default model")
    client = await AsyncEngineClient.start(config)
    info = getattr(client, "info", None) or {}
    if "load_seconds" in info:
        logger.info("Model loaded in %.2f s (device %s)", info["load_seconds"], info.get("device", "?"))
    if "kv_seconds" in info:
        logger.info("KV cache allocated in %.2f s: %s blocks of %s tokens", info["kv_seconds"],
                    info.get("num_blocks", "?"), info.get("block_size", "?"))
    logger.info("Engine ready in %.2f s (max_model_len=%d)", time.perf_counter() - t0, client.max_model_len)

    app = build_app(client)
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its request.
    # shutdown_timeout: drain() has already waited for running generations; this bounds the rest.
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True, shutdown_timeout=5.0,
                           access_log=None)
    await runner.setup()
    host, port = getattr(config, "host", None) or "0.0.0.0", int(getattr(config, "port", None) or 8000)
    await web.TCPSite(runner, host, port).start()
    logger.info("Serving %s on http://%s:%d (ready %.2f s after start)", app[SERVING].model_name, host, port,
                time.perf_counter() - t0)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stats_task = asyncio.create_task(refresh_periodically(app[METRICS], client))
    dead_task = asyncio.create_task(client.wait_dead())
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait({dead_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    engine_died = dead_task.done()
    for t in (stats_task, dead_task, stop_task):
        t.cancel()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)  # a second Ctrl-C / SIGTERM now kills at once
    if engine_died:
        # In-flight requests get EngineDeadError from the client and end with an error right away.
        logger.error("The engine process died; shutting down")
        await runner.cleanup()
    else:
        await drain(runner, app[SERVING], SHUTDOWN_TIMEOUT_S)
    try:
        await client.shutdown()
    except Exception:
        logger.warning("Engine shutdown failed", exc_info=True)
    logger.info("Server stopped")
    return 1 if engine_died else 0


async def drain(runner: web.BaseRunner, serving: Serving, timeout: float) -> None:
    """Graceful stop: close the listener, let running generations finish for up to `timeout`
    seconds, end the rest with an error (a stream gets an error event, not a cut connection)."""
    for site in list(runner.sites):
        await site.stop()
    logger.info("Shutting down: no new connections; waiting up to %.0f s for %d running request(s)",
                timeout, serving.num_in_flight)
    deadline = time.monotonic() + timeout
    while serving.num_in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if serving.num_in_flight:
        logger.warning("Ending %d request(s) still running after %.0f s", serving.num_in_flight, timeout)
        serving.abort_all(P.APIError("The server is shutting down; the request was not finished.", 503))
    await runner.cleanup()  # closes idle keep-alive connections; handlers left now only write their ending
