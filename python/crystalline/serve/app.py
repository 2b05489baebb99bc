"""The HTTP side of `crystalline serve`: a FastAPI app with the OpenAI
endpoints over one `Scheduler`, and `listen`/`run` to serve it with uvicorn.

Every answer that is not a success has OpenAI's error shape,
`{"error": {"message", "type", "param", "code"}}`, with the HTTP status
that says what went wrong: 400 bad input (invalid JSON, a field of the wrong
type or out of range, a prompt that does not fit the context), 401 no or a
wrong API key, 404 an unknown model or path, 429 a full queue. A bug answers
500 with a one-line message; its traceback goes to the server's log only.

Text is cut before the first stop string, and a stream holds back the few
characters that could still begin one, so no stop string ever reaches the
client; the choice's sequence is then cancelled, as it is when the client
disconnects, and its slot freed at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from crystalline.data.tokenizer import Tokenizer
from crystalline.errors import UserError
from crystalline.inference import LoadedModel, Sampling, TextStream
from crystalline.serve.scheduler import ERROR, STOP, Generation, Overloaded, Scheduler
from crystalline.serve.schemas import (CHAT_STOP, DEFAULT_MAX_TOKENS, MAX_CHOICES, ChatRequest, CompletionRequest,
                                       GenerateRequest, render_chat)

# Connections the kernel holds before the server accepts them (uvicorn's default).
BACKLOG = 2048
# Seconds that Ctrl-C lets running requests finish before cancelling them.
DRAIN_SECONDS = 5
OPEN_PATHS = ("/health",)  # served without the API key
API_KEY = re.compile(r"[!-~]+")  # what a client can send as `Authorization: Bearer KEY`
# The status the access log shows for a request whose client left before its answer (as nginx).
CLIENT_GONE = 499
# How pydantic names the plain members of a union in an error's location.
UNION_TAGS = {"str", "int", "float", "bool"}
ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error"}


class AsciiJSONResponse(JSONResponse):
    """JSON with everything past ASCII escaped: text from a request or a
    path may hold half a surrogate pair, which UTF-8 cannot carry."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    @property
    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return AsciiJSONResponse(self.body, self.status, headers)


# -- text of one choice --------------------------------------------------------


class ChoiceText:
    """One choice's text as its tokens arrive: decoded without splitting a
    UTF-8 character, cut before the first stop string, and released except
    for an end that may be the beginning of one."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]) -> None:
        self.ids: list[int] = []
        self.finish: str | None = None
        self._stream = TextStream(tokenizer)
        self._text = ""
        self._sent = 0
        self._stops = stops

    @property
    def text(self) -> str:
        """All the text released."""
        return self._text[: self._sent]

    def push(self, token: int) -> str:
        """The text a new token releases; sets `finish` when it completes a stop string."""
        self.ids.append(token)
        self._text += self._stream.push(self.ids)
        return self._release(final=False)

    def close(self, reason: str) -> str:
        """The rest of the text once the sequence has ended for `reason`."""
        self._text += self._stream.finish(self.ids)
        text = self._release(final=True)
        self.finish = self.finish or reason
        return text

    def _partial_stop(self) -> int:
        """Characters at the end of the text that begin a stop string (held back)."""
        ends = (k for stop in self._stops for k in range(1, min(len(stop), len(self._text) + 1))
                if self._text.endswith(stop[:k]))
        return max(ends, default=0)

    def _release(self, final: bool) -> str:
        # no stop string can begin in text released: its possible beginnings are held back
        hits = [i for i in (self._text.find(s, self._sent) for s in self._stops) if i >= 0]
        if hits:
            end = min(hits)
            self.finish = STOP
        else:
            end = len(self._text) if final else max(self._sent, len(self._text) - self._partial_stop())
        new = self._text[self._sent : end]
        self._sent = end
        return new


async def choice_texts(gen: Generation, texts: list[ChoiceText]) -> AsyncIterator[tuple[int, str, str | None]]:
    """(choice, new text, finish reason once it has ended) as a request's
    tokens arrive. However it ends, its sequences are cancelled."""
    live = len(texts)
    try:
        while live:
            for ev in await gen.queue.get():
                t = texts[ev.choice]
                if t.finish:  # stopped by a stop string already
                    continue
                if ev.finish == ERROR:
                    raise ApiError(500, "decoding failed; the server's log says why")
                if ev.finish:
                    text = t.close(ev.finish)
                else:
                    text = t.push(ev.token)
                    if t.finish:
                        gen.cancel(ev.choice)
                if t.finish:
                    live -= 1
                    yield ev.choice, text, t.finish
                elif text:
                    yield ev.choice, text, None
    finally:
        gen.cancel()


# -- the two response formats -------------------------------------------------


class CompletionFormat:
    object = chunk_object = "text_completion"
    id_prefix = "cmpl"

    @staticmethod
    def choice(i: int, text: str, finish: str | None) -> dict:
        return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}

    delta = choice

    @staticmethod
    def opening(i: int, echo: str) -> dict | None:
        return CompletionFormat.choice(i, echo, None) if echo else None


class ChatFormat:
    object, chunk_object = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl"

    @staticmethod
    def choice(i: int, text: str, finish: str | None) -> dict:
        return {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    @staticmethod
    def delta(i: int, text: str, finish: str | None) -> dict:
        return {"index": i, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish}

    @staticmethod
    def opening(i: int, _echo: str) -> dict:
        return {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


@dataclass
class Job:
    """One accepted request: its prompts as text and ids, and how to answer."""

    body: GenerateRequest
    fmt: type[CompletionFormat] | type[ChatFormat]
    prompts: list[str]
    ids: list[list[int]]
    stops: list[str]
    echo: bool = False
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return f"{self.fmt.id_prefix}-{self.uid}"

    def usage(self, texts: list[ChoiceText]) -> dict:
        prompt, completion = sum(map(len, self.ids)), sum(len(t.ids) for t in texts)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def echoed(self, choice: int) -> str:
        return self.prompts[choice // self.body.n] if self.echo else ""


# -- the app ------------------------------------------------------------------


class BearerAuth:
    """Requests without `Authorization: Bearer KEY` get 401 before their body
    is read; /health stays open."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.expected = b"Bearer " + key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "no API key given: send `Authorization: Bearer KEY`" if not given else "wrong API key"
                await ApiError(401, message, code="invalid_api_key").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Server:
    """What the routes share: the model, its name and the scheduler."""

    def __init__(self, model: LoadedModel, scheduler: Scheduler, name: str) -> None:
        self.model, self.scheduler, self.name = model, scheduler, name
        self.created = int(model.path.stat().st_mtime)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise ApiError(404, f"the model `{name}` does not exist; this server serves `{self.name}`", "model",
                           "model_not_found")

    def encode(self, text: str, param: str) -> list[int]:
        """A prompt's ids; an empty prompt starts from end-of-text, as a new document."""
        try:
            text.encode()
        except UnicodeEncodeError as err:  # JSON can carry half of a surrogate pair; no tokenizer takes it
            raise ApiError(400, f"{param} is not valid Unicode: {err.reason} at character {err.start}", param) \
                from None
        return self.model.tokenizer.encode(text) or [self.model.tokenizer.eot_id]

    def max_tokens(self, ids: list[list[int]], asked: int | None, default: int | None, param: str) -> int:
        """New tokens per choice: prompts longer than the context are refused, not slid."""
        block, longest = self.model.block_size, max(map(len, ids))
        if longest > block:
            raise ApiError(400, f"the prompt is {longest} tokens, more than this model's context of {block} "
                                "tokens; shorten it", param, "context_length_exceeded")
        room = block - longest
        if asked is None:
            if room < 1:
                raise ApiError(400, f"the prompt fills this model's context of {block} tokens and leaves no room "
                                    "for a reply; shorten it", param, "context_length_exceeded")
            return room if default is None else min(default, room)
        if asked > room:
            raise ApiError(400, f"max_tokens is {asked}, but this model's context of {block} tokens leaves "
                                f"{room} after the {longest}-token prompt; lower max_tokens or shorten the prompt",
                           "max_tokens", "context_length_exceeded")
        return asked


def create_app(model: LoadedModel, max_batch: int = 8, max_queue: int = 64, api_key: str | None = None,
               name: str | None = None) -> FastAPI:
    """The app serving `model` as `name` (default: its run directory's name).
    `run` serves it, starting and stopping its scheduler's thread
    (`app.state.server.scheduler`)."""
    if api_key is not None and not API_KEY.fullmatch(api_key):
        raise UserError("--api-key must be one or more printable ASCII characters without spaces, as a Bearer "
                        "token travels in an HTTP header")
    scheduler = Scheduler(model, max_batch, max_queue)
    app = FastAPI(title="crystalline", summary="An OpenAI-compatible server for a Crystalline model",
                  default_response_class=AsciiJSONResponse)
    app.state.server = Server(model, scheduler, name or model.path.parent.name)
    if api_key is not None:
        app.add_middleware(BearerAuth, key=api_key)
    app.add_exception_handler(ApiError, lambda _req, err: err.response())
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, lambda _req, _err: ApiError(500, "internal error; the server's log says "
                                                                          "why").response())
    for method, path, endpoint in ROUTES:
        app.add_api_route(path, endpoint, methods=[method])
    return app


def _invalid(_request: Request, err: RequestValidationError) -> Response:
    """A body that is not JSON, or a field of the wrong type or out of range: one line naming it."""
    errors = err.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return ApiError(400, f"the body is not valid JSON: {detail}".rstrip(": ")).response()
    path = _field_path(first["loc"])
    param = path.split(".")[0] or None
    # a union (str or list) reports one error per member: give them all, once
    msg = "; or ".join(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in errors
                                     if _field_path(e["loc"]) == path))
    if first["type"] != "value_error" or not msg.startswith(path):  # our own messages name their field
        msg = f"{path or 'request body'}: {msg}"
    return ApiError(400, msg, param).response()


def _field_path(loc: tuple) -> str:
    """"messages.0.role" from pydantic's location, without "body" and the
    names it gives a union's members ("str", "list[str]")."""
    return ".".join(str(p) for p in loc if p != "body" and not (isinstance(p, str) and (p in UNION_TAGS or "[" in p)))


def _http_error(request: Request, err: StarletteHTTPException) -> Response:
    if err.status_code == 404:
        return ApiError(404, f"no endpoint {request.url.path}; this server has {', '.join(ENDPOINTS)}").response()
    return ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}").response()


def _server(request: Request) -> Server:
    return request.app.state.server


async def health(request: Request) -> dict:
    server = _server(request)
    return {"status": "ok", "model": server.name, **server.scheduler.status()}


def _model_card(server: Server) -> dict:
    return {"id": server.name, "object": "model", "created": server.created, "owned_by": "crystalline",
            "context_length": server.model.block_size}


async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_model_card(_server(request))]}


async def get_model(name: str, request: Request) -> dict:
    server = _server(request)
    server.check_model(name)
    return _model_card(server)


async def completions(body: CompletionRequest, request: Request) -> Response:
    server = _server(request)
    server.check_model(body.model)
    ids = [server.encode(p, "prompt") for p in body.prompts]
    job = Job(body, CompletionFormat, body.prompts, ids, body.stops, body.echo)
    return await _answer(request, job, server.max_tokens(ids, body.max_tokens, DEFAULT_MAX_TOKENS, "prompt"))


async def chat_completions(body: ChatRequest, request: Request) -> Response:
    server = _server(request)
    server.check_model(body.model)
    prompt = render_chat(body.messages)
    ids = [server.encode(prompt, "messages")]
    job = Job(body, ChatFormat, [prompt], ids, [*body.stops, CHAT_STOP])
    return await _answer(request, job, server.max_tokens(ids, body.limit, None, "messages"))


async def _answer(request: Request, job: Job, max_tokens: int) -> Response:
    server, body = _server(request), job.body
    if len(job.ids) * body.n > MAX_CHOICES:
        raise ApiError(400, f"{len(job.ids)} prompts x n={body.n} asks for more than {MAX_CHOICES} choices", "n")
    sampling = Sampling(max_tokens, body.temperature, body.top_k, body.top_p, body.seed)
    try:
        gen = server.scheduler.submit(job.ids, body.n, sampling, asyncio.get_running_loop())
    except Overloaded as err:
        raise ApiError(429, str(err), code="rate_limit_exceeded") from None
    texts = [ChoiceText(server.model.tokenizer, job.stops) for _ in gen.choices]
    if body.stream:
        return StreamingResponse(_events(server, job, gen, texts), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    if not await _unless_disconnected(request, _drain(choice_texts(gen, texts))):
        return Response(status_code=CLIENT_GONE)
    choices = [job.fmt.choice(i, job.echoed(i) + t.text, t.finish) for i, t in enumerate(texts)]
    return AsciiJSONResponse({"id": job.id, "object": job.fmt.object, "created": job.created, "model": server.name,
                         "choices": choices, "usage": job.usage(texts)})


async def _drain(events: AsyncIterator) -> None:
    async for _ in events:
        pass


async def _unless_disconnected(request: Request, work: Awaitable[None]) -> bool:
    """Run `work`; False when the client went away first (then the work is
    cancelled, and with it the request's sequences)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        task.cancel()  # nothing when it has finished
    if task not in done:
        return False
    task.result()  # raise what decoding raised
    return True


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(server: Server, job: Job, gen: Generation, texts: list[ChoiceText]) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text of a choice, its finish
    reason in its last chunk, usage with the last chunk (or in a chunk of its
    own when stream_options.include_usage asks, as OpenAI does), then [DONE]."""

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        data = {"id": job.id, "object": job.fmt.chunk_object, "created": job.created, "model": server.name,
                "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    separate = job.body.include_usage
    for i in range(len(texts)):
        opening = job.fmt.opening(i, job.echoed(i))
        if opening is not None:
            yield chunk([opening])
    finished = 0
    try:
        async for i, text, finish in choice_texts(gen, texts):
            finished += finish is not None
            last = finished == len(texts) and not separate
            yield chunk([job.fmt.delta(i, text, finish)], job.usage(texts) if last else None)
    except ApiError as err:
        yield f"data: {json.dumps(err.body)}\n\n"
        return
    if separate:
        yield chunk([], job.usage(texts))
    yield "data: [DONE]\n\n"


ROUTES = [("GET", "/health", health), ("GET", "/v1/models", list_models), ("GET", "/v1/models/{name:path}", get_model),
          ("POST", "/v1/completions", completions), ("POST", "/v1/chat/completions", chat_completions)]
ENDPOINTS = [f"{method} {path}" for method, path, _ in ROUTES if "{" not in path]


# -- serving ------------------------------------------------------------------


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0: any free port), refused with a UserError."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        # proto IPPROTO_TCP, as uvicorn's own sockets: asyncio sets TCP_NODELAY only on those, and
        # without it each response waits for the client's delayed ACK (40 ms)
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
        return sock
    except (OSError, UnicodeError) as err:  # UnicodeError: a name IDNA cannot encode
        if sock is not None:
            sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({getattr(err, 'strerror', None) or err})") from None


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps other machines out."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """What to tell the user when `host` lets other machines in."""
    if is_loopback(host):
        return None
    key = "only with the API key" if api_key else "with no API key (pass --api-key)"
    return f"listening on {host}: other machines that can reach this one can use the model, {key}"


def run(app: FastAPI, sock: socket.socket) -> None:
    """Serve until Ctrl-C, which lets running requests finish for up to
    DRAIN_SECONDS, cancels the rest and returns (a second Ctrl-C cancels at once)."""
    # The scheduler is started and stopped here, not by an ASGI lifespan: on
    # a second Ctrl-C uvicorn skips a lifespan's end and logs its
    # cancellation as an error with a traceback.
    scheduler = app.state.server.scheduler
    scheduler.start()
    try:
        serve_forever(app, sock)
    finally:
        scheduler.close()


def serve_forever(app: ASGIApp, sock: socket.socket, access_log: bool = True) -> None:
    """Serve `app` with uvicorn on `sock` until Ctrl-C, which lets running
    requests finish for up to DRAIN_SECONDS (a second Ctrl-C cancels them
    at once); `access_log`: a line per request. The dashboard is served this
    way too, without the lines for its polls."""
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=DRAIN_SECONDS, lifespan="off",
                            access_log=access_log)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C again once it has shut down
        pass
