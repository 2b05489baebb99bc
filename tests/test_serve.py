"""`crystalline serve`: a real server (the command, as a subprocess on
127.0.0.1) over one tiny trained run, driven by the official `openai` client
and by raw httpx for bad input; and the scheduler itself, stepped by hand,
for what timing would otherwise decide (the queue, cancelling, slow readers).

Greedy answers are checked against `LoadedModel.generate` on the same run:
the server must write exactly what the library writes."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sysconfig
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from crystalline import _core, load  # noqa: E402
from crystalline.inference import Sampling  # noqa: E402
from crystalline.serve import Overloaded, Scheduler, create_app, exposure_warning, listen  # noqa: E402
from crystalline.serve.app import ChoiceText, choice_texts  # noqa: E402
from crystalline.serve.scheduler import Event, Generation  # noqa: E402
from crystalline.serve.schemas import Message, render_chat  # noqa: E402
from commandline import cli, started, train  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TINY = ["--vocab-size", "300", "--embed-dim", "32", "--num-layers", "2", "--num-heads", "2", "--batch-size", "8",
        "--seq-len", "64", "--no-progress", "--sample-tokens", "0", "--ext", ".py"]
PROMPTS = ["def load(path):\n", "import json\n", "class Encoder:\n    def", "x = ", "    return ", "# ",
           "for key in", "if not ", "try:\n", "raise ValueError(", "def dumps(obj", "    if isinstance(",
           "import re\n", "\"\"\"", "s = '", "while True:\n"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, env) -> Path:
    return train(tmp_path_factory.mktemp("run") / "tiny", STDLIB / "json", env, *TINY, "--max-steps", "20")


@pytest.fixture(scope="module")
def model(run_dir):
    return load(run_dir)


@dataclass
class Running:
    url: str
    proc: subprocess.Popen

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=30)


@contextmanager
def serving(run: Path, env: dict, log: Path, *flags: str) -> Iterator[Running]:
    """`crystalline serve RUN --port 0 FLAGS` until the block ends; then
    Ctrl-C must stop it with exit code 0."""
    with started(["serve", str(run), "--port", "0", *flags], env, log, r" at (http://\S+)/v1$") as (url, proc):
        yield Running(url, proc)


@pytest.fixture(scope="module")
def server(run_dir, env, tmp_path_factory) -> Iterator[Running]:
    with serving(run_dir, env, tmp_path_factory.mktemp("log") / "serve.log") as s:
        yield s


def greedy(model, prompt: str, max_tokens: int) -> str:
    return model.generate(prompt, max_tokens=max_tokens, temperature=0)


# -- the official client ------------------------------------------------------


def test_completions_write_what_the_library_writes(server, model):
    client = server.client()
    name = client.models.list().data[0].id
    assert name == "tiny" and client.models.retrieve("tiny").id == "tiny"
    r = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    prompt_ids = model.tokenizer.encode(PROMPTS[0])
    ids = model.generate_ids([prompt_ids], Sampling(max_tokens=20, temperature=0))[0]
    expected = model.tokenizer.decode(ids)
    assert r.choices[0].text == expected and r.object == "text_completion"
    assert r.choices[0].finish_reason == ("length" if len(ids) == 20 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt_ids), len(ids))
    assert r.usage.total_tokens == len(prompt_ids) + len(ids)
    echoed = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=20, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPTS[0] + expected
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_streaming_sends_the_same_text_in_pieces_then_done(server, model):
    client = server.client()
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=30, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == greedy(model, PROMPTS[1], 30)
    assert [c.choices[0].finish_reason for c in chunks][-1] in ("stop", "length")
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].usage.completion_tokens > 0
    body = {"prompt": PROMPTS[1], "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    raw = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    events = raw.text.split("\n\n")
    assert raw.headers["content-type"].startswith("text/event-stream") and events[-2:] == ["data: [DONE]", ""]
    last = json.loads(events[-3].removeprefix("data: "))
    assert last["choices"] == [] and last["usage"]["prompt_tokens"] == len(model.tokenizer.encode(PROMPTS[1]))


def test_n_choices_and_seeds_reproduce(server):
    client = server.client()

    def sample(seed: int, **kw) -> list[str]:
        r = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=20, temperature=1.0, seed=seed,
                                      **kw)
        assert [c.index for c in r.choices] == list(range(len(r.choices)))
        return [c.text for c in r.choices]

    three = sample(7, n=3)
    assert len(three) == 3 and len(set(three)) > 1  # each choice draws from a stream of its own
    assert sample(7, n=3) == three and sample(8, n=3) != three
    assert sample(7, n=1) == three[:1]
    streamed = ["", "", ""]
    for chunk in client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=20, temperature=1.0, seed=7,
                                           n=3, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == three
    # a list of prompts: choice i*n + j is sample j of prompt i
    both = client.completions.create(model="tiny", prompt=[PROMPTS[2], PROMPTS[3]], max_tokens=20, temperature=1.0,
                                     seed=7, n=3)
    assert [c.text for c in both.choices][:3] == three and len(both.choices) == 6


def test_stop_strings_cut_the_text_in_both_modes(server, model):
    full = greedy(model, PROMPTS[0], 40)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    client = server.client()
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop, "\x00"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=40,
                                                                   temperature=0, stop=stop, stream=True)]
    assert "".join(pieces) == expected and all(stop not in p for p in pieces)


def test_chat_continues_the_plain_template(server, model):
    messages = [{"role": "system", "content": "Python."}, {"role": "user", "content": "Load."}]
    prompt = render_chat([Message.model_validate(m) for m in messages])
    assert prompt == "System: Python.\nUser: Load.\nAssistant:"
    expected = greedy(model, prompt, 20).split("\nUser:")[0]  # the reply ends at a new user turn
    client = server.client()
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.usage.prompt_tokens == len(model.tokenizer.encode(prompt))
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    # without max_tokens the reply may fill what the context leaves
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0)
    assert r.usage.total_tokens <= model.block_size


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, env) -> Path:
    """A tiny model trained on chat transcripts in the plain template: after
    its reply it goes on to write the next user turn."""
    src = tmp_path_factory.mktemp("transcripts")
    asks = ["Load.", "Save.", "Sort a list.", "Parse it.", "Print x."]
    talks = ["System: Python.\n" + "".join(f"User: {asks[(i + k) % 5]}\nAssistant: ok\n" for k in range(3))
             for i in range(400)]
    (src / "chat.txt").write_text("\n".join(talks))
    flags = [*TINY[: TINY.index("--ext")], "--ext", ".txt", "--epochs", "30", "--max-steps", "400"]
    return train(tmp_path_factory.mktemp("run") / "chat", src, env, *flags)


def test_a_chat_reply_ends_where_the_model_begins_the_next_user_turn(chat_run, env, tmp_path):
    messages = [{"role": "system", "content": "Python."}, {"role": "user", "content": "Load."}]
    prompt = render_chat([Message.model_validate(m) for m in messages])
    written = greedy(load(chat_run), prompt, 20)
    assert "\nUser:" in written, written  # the model does write the next turn
    expected = written.split("\nUser:")[0]
    with serving(chat_run, env, tmp_path / "serve.log") as s:
        client = s.client()
        r = client.chat.completions.create(model="chat", messages=messages, max_tokens=20, temperature=0)
        assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
        chunks = list(client.chat.completions.create(model="chat", messages=messages, max_tokens=20, temperature=0,
                                                     stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_16_concurrent_greedy_streams_each_get_their_text_alone(server):
    client = server.client()
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=40, temperature=0).choices[0].text
             for p in PROMPTS]

    async def everyone() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60) as c:
            async def one(prompt: str) -> str:
                stream = await c.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0,
                                                    stream=True)
                return "".join([chunk.choices[0].text async for chunk in stream])

            return await asyncio.gather(*(one(p) for p in PROMPTS))

    assert asyncio.run(everyone()) == alone


@contextmanager
def in_process(model, **kw) -> Iterator[tuple[tuple[str, int], Scheduler]]:
    """The app on 127.0.0.1, served from a thread of this process with its
    scheduler not started: the test decides when (and whether) it steps."""
    app = create_app(model, **kw)
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        yield sock.getsockname()[:2], app.state.server.scheduler
    finally:
        server.should_exit = True
        thread.join()


def until(condition, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_client_that_leaves_frees_its_request(model, stream):
    with in_process(model, max_batch=1) as (address, sched):
        occupant = Sampling(max_tokens=5, temperature=0)
        sched.submit([[1]], 1, occupant, asyncio.new_event_loop())
        sched.step()  # the one slot is taken, and nothing else decodes: requests wait
        body = json.dumps({"prompt": "x", "max_tokens": 5, "stream": stream}).encode()
        with socket.create_connection(address) as conn:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            until(lambda: sched.status()["waiting"] == 1, "the request never arrived")
        until(lambda: sched.status()["waiting"] == 0, "the request still waits after its client left")


# -- bad input ------------------------------------------------------------------

BAD = [
    ("not json", b"{\"prompt\": ", 400, "not valid JSON"),
    ("a list body", [1, 2], 400, "request body"),
    ("no prompt", {"max_tokens": 3}, 400, "prompt"),
    ("prompt of ids", {"prompt": [1, 2]}, 400, "prompt"),
    ("max_tokens as text", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("max_tokens as float", {"prompt": "x", "max_tokens": 5.5}, 400, "max_tokens"),
    ("n as bool", {"prompt": "x", "n": True}, 400, "n"),
    ("stream as text", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("temperature as text", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("max_tokens 0", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens -1", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens past the context", {"prompt": "x", "max_tokens": 64}, 400, "max_tokens is 64"),
    ("a prompt longer than the context", {"prompt": "x = 1\n" * 100}, 400, "context of 64"),
    ("negative temperature", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("top_p 0", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("negative top_k", {"prompt": "x", "top_k": -1}, 400, "top_k"),
    ("n 0", {"prompt": "x", "n": 0}, 400, "n"),
    ("too many choices", {"prompt": ["x"] * 100, "n": 2}, 400, "choices"),
    ("empty stop", {"prompt": "x", "stop": ""}, 400, "stop"),
    ("five stops", {"prompt": "x", "stop": list("abcde")}, 400, "stop"),
    ("logprobs", {"prompt": "x", "logprobs": 2}, 400, "logprobs is not supported"),
    ("unknown model", {"prompt": "x", "model": "gpt-4"}, 404, "gpt-4"),
]
BAD_CHAT = [
    ("no messages", {"messages": []}, 400, "messages"),
    ("messages as text", {"messages": "hi"}, 400, "messages"),
    ("unknown role", {"messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
    ("image content", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ("negative temperature", {"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ("max_completion_tokens 0", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
]


@pytest.mark.parametrize("path,case,body,status,says", [("completions", *c) for c in BAD]
                         + [("chat/completions", *c) for c in BAD_CHAT], ids=lambda v: v if isinstance(v, str)
                         else None)
def test_bad_input_gets_an_openai_error(server, path, case, body, status, says):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {
        "json": body}
    r = httpx.post(f"{server.url}/v1/{path}", timeout=30, **kw)
    assert r.status_code == status, (case, r.text)
    error = r.json()["error"]
    assert says in error["message"] and error["type"] and "Traceback" not in r.text, error


# Values for any field: right and wrong types, edges, text no tokenizer takes.
ANY = [None, True, False, 0, 1, -1, 3, 2**31, 2**64, -(2**63), 10**30, 0.0, 0.5, 1.0, -0.5, 1e308, float("nan"),
       float("inf"), "", "x", "a\ud800b", "\x00", [], ["x"], ["x", ""], [1, 2], [["x"]], {}, {"include_usage": True},
       [{"role": "user", "content": "hi"}], [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]]
FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "echo", "stream",
          "stream_options", "logprobs", "messages", "max_completion_tokens"]
VALID = {"completions": {"prompt": "x", "max_tokens": 3},
         "chat/completions": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3}}


@pytest.mark.parametrize("path", sorted(VALID))
def test_no_field_value_gets_a_server_error(server, path):
    """Every value of ANY in every field of a valid request: an answer or an
    OpenAI error, never a 500 (nor an error inside a stream)."""
    wrong = []
    with httpx.Client(base_url=f"{server.url}/v1", timeout=30) as client:
        for field in FIELDS:
            for value in ANY:
                body = VALID[path] | {field: value}
                r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
                if r.status_code != 200:
                    ok = r.status_code in (400, 404) and bool(r.json()["error"]["message"])
                elif field == "stream" and value is True:
                    ok = r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text
                else:
                    ok = "usage" in r.json()
                if not ok:
                    wrong.append((field, value, r.status_code, r.text[:200]))
    assert not wrong, wrong


def test_unknown_paths_and_methods_get_openai_errors(server):
    r = httpx.get(f"{server.url}/v1/engines")
    assert r.status_code == 404 and "/v1/completions" in r.json()["error"]["message"]
    r = httpx.get(f"{server.url}/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/models/gpt-4").status_code == 404


# -- the key, the queue, Ctrl-C ---------------------------------------------------


def test_an_api_key_is_required_and_ctrl_c_drains(run_dir, env, tmp_path):
    with serving(run_dir, env, tmp_path / "serve.log", "--api-key", "s3cret") as s:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        r = httpx.post(f"{s.url}/v1/completions", content=b"not even json")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{s.url}/health").status_code == 200
        assert s.client("s3cret").completions.create(model="tiny", prompt="x", max_tokens=2).choices
        body = {"prompt": PROMPTS[0], "max_tokens": 50, "n": 8, "stream": True}
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=30,
                          headers={"Authorization": "Bearer s3cret"}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            s.proc.send_signal(signal.SIGINT)  # the request in flight finishes
            assert [line for line in lines if line][-1] == "data: [DONE]"


def test_past_max_queue_requests_get_429(run_dir, env, tmp_path):
    with serving(run_dir, env, tmp_path / "serve.log", "--max-batch", "2", "--max-queue", "0") as s:
        with pytest.raises(openai.RateLimitError) as err:
            s.client().completions.create(model="tiny", prompt="x", max_tokens=2, n=3)  # one choice would wait
        assert err.value.status_code == 429 and "--max-queue 0" in err.value.message
        assert len(s.client().completions.create(model="tiny", prompt="x", max_tokens=2, n=2).choices) == 2


def test_command_line_refusals(run_dir, env, tmp_path):
    r = cli(["serve", str(tmp_path / "nothing"), "--port", "0"], env)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    r = cli(["serve", str(run_dir), "--host", "0.0.0.0", "--max-batch", "0"], env)
    assert r.returncode == 2 and "warning: listening on 0.0.0.0" in r.stderr and "error: --max-batch" in r.stderr
    for flags, says in [(["--max-batch", str(10**15)], "--max-batch"), (["--api-key", ""], "--api-key"),
                        (["--api-key", "a key"], "--api-key"), (["--host", "no.such.host.invalid"], "cannot listen"),
                        (["--host", "\udcff" * 2], "cannot listen")]:
        r = cli(["serve", str(run_dir), "--port", "0", *flags], env, timeout=60)  # a server that starts: no answer
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, (flags, r.stderr)
    with serving(run_dir, env, tmp_path / "serve.log") as s:
        port = s.url.rsplit(":", 1)[1]
        r = cli(["serve", str(run_dir), "--port", port], env)
        assert r.returncode == 2 and f"error: cannot listen on 127.0.0.1:{port}" in r.stderr
    with listen("127.0.0.1", 0) as sock:  # asyncio sets TCP_NODELAY on its connections only for IPPROTO_TCP
        assert sock.proto == socket.IPPROTO_TCP
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None
    assert "--api-key" in exposure_warning("0.0.0.0", None) and "--api-key" not in exposure_warning("::", "k")


# -- the scheduler, stepped by hand -----------------------------------------------


def test_the_queue_cancelling_and_slow_readers(model):
    loop = asyncio.new_event_loop()
    sched = Scheduler(model, max_batch=1, max_queue=1)  # its thread not started: each step is ours
    ids = model.tokenizer.encode(PROMPTS[0])
    greedy5 = Sampling(max_tokens=5, temperature=0)
    first = sched.submit([ids], 1, greedy5, loop)  # takes the free slot
    second = sched.submit([ids], 1, greedy5, loop)  # waits for it
    with pytest.raises(Overloaded):
        sched.submit([ids], 1, greedy5, loop)
    sched.step()
    assert sched.status() == {"running": 1, "waiting": 1, "max_batch": 1, "max_queue": 1}
    first.cancel()  # the client left: its slot goes to the next request at the next step
    sched.step()
    assert sched.status()["running"] == 1 and sched.status()["waiting"] == 0
    while sched.status()["running"]:  # nobody reads either queue, and decoding goes on regardless
        sched.step()
    loop.run_until_complete(asyncio.sleep(0))  # hand over what the steps delivered
    events = [e for _ in range(second.queue.qsize()) for e in second.queue.get_nowait()]
    assert [e.token for e in events[:-1]] == model.generate_ids([ids], greedy5)[0]
    assert events[-1].finish in ("stop", "length")
    loop.close()


def test_one_step_decodes_every_running_sequence(model):
    loop = asyncio.new_event_loop()
    sched = Scheduler(model, max_batch=5)
    prompts = [model.tokenizer.encode(p) for p in PROMPTS[:3]]
    gens = [sched.submit([ids], 1, Sampling(max_tokens=8, temperature=0), loop) for ids in prompts]
    sched.step()  # three prompts of different lengths joined and each got its first token
    later = sched.submit([prompts[0]], 2, Sampling(max_tokens=8, temperature=0), loop)
    sched.step()  # two more joined between steps
    loop.run_until_complete(asyncio.sleep(0))
    assert [g.queue.qsize() for g in gens] == [2, 2, 2]  # a step's events per request
    assert [e.choice for e in later.queue.get_nowait()] == [0, 1]
    loop.close()


def test_a_stop_string_ends_its_choice_alone(model):
    async def read() -> list:
        gen = Generation([[1], [2]], 1, Sampling(max_tokens=9), asyncio.get_running_loop())
        texts = [ChoiceText(model.tokenizer, ["bc"]) for _ in gen.choices]
        a, b, c = (model.tokenizer.encode(ch)[0] for ch in "abc")
        for events in [[Event(0, a), Event(1, b)], [Event(0, b), Event(1, a)], [Event(0, c), Event(1, b)]]:
            gen.queue.put_nowait(events)
        stream = choice_texts(gen, texts)
        got = [await anext(stream) for _ in range(3)]
        assert [ch.done for ch in gen.choices] == [True, False]  # the stopped choice's slot is free at the next step
        await stream.aclose()
        return got

    # a "b" at the end is held back while it may begin "bc"; the stop string itself never shows
    assert asyncio.run(read()) == [(0, "a", None), (1, "ba", None), (0, "", "stop")]


def test_a_sampler_draws_from_its_own_seeded_stream():
    logits = np.random.default_rng(0).normal(size=(64, 50)).astype(np.float32)
    draw = lambda seed, stream: _core.Sampler(seed, stream).sample(logits, 1.0, 0, 1.0)  # noqa: E731
    assert draw(3, 0) == draw(3, 0) and draw(3, 0) != draw(3, 1) and draw(3, 0) != draw(4, 0)
    assert _core.Sampler(3).sample(logits, 0.0) == list(np.argmax(logits, axis=1))
    with pytest.raises(ValueError, match="temperature"):
        _core.Sampler().sample(logits, -1.0)
