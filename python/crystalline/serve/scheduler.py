"""Continuous batching: one `_core.Model` whose key/value cache has
`max_batch` slots, decoded by a background thread one step at a time for
every running sequence at once.

Requests join and leave between steps. A new sequence takes a free slot: its
prompt but the last token is fed in one decode call without logits (a
sequence listed k times takes k positions), and the same step decodes it
with the others from its last prompt token. Each sequence draws its tokens
with its own seeded `_core.Sampler`, so what it writes depends on its
request alone, not on what else is decoded beside it.

Tokens reach a request through its asyncio queue (`loop.call_soon_threadsafe`),
which never blocks the thread: a slow client only lets its own queue grow
(to at most max_tokens tokens), and a cancelled sequence (client gone, stop
string found) gives its slot back at the next step.

Requests are served first come, first served. A request waits while some of
its sequences have no slot; `submit` refuses a request that would make more
than `max_queue` wait (`Overloaded`, HTTP 429).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from crystalline import _core
from crystalline.errors import UserError
from crystalline.guard import core_refusals, ensure_memory
from crystalline.inference import LoadedModel, Sampling

log = logging.getLogger(__name__)

# Finish reasons: end-of-text, max_tokens reached, the server failed.
STOP, LENGTH, ERROR = "stop", "length", "error"


class Overloaded(Exception):
    """More requests would wait than the queue holds, or the server is closing."""


@dataclass(frozen=True)
class Event:
    """What a step produced for one choice: a token id, or its finish reason."""

    choice: int
    token: int | None = None
    finish: str | None = None


class Choice:
    """One choice of a request: its prompt, slot, sampler and progress."""

    def __init__(self, request: Generation, choice: int, prompt: Sequence[int], sampler: _core.Sampler) -> None:
        self.request = request
        self.choice = choice
        self.prompt = prompt
        self.sampler = sampler
        self.slot: int | None = None
        self.last = prompt[-1]  # the token the next step feeds
        self.count = 0  # tokens generated
        self.done = False  # finished or cancelled: its slot is free at the next step


class Generation:
    """One request's sequences (choice i*n + j is sample j of prompt i) and
    the queue their events arrive on, a list per step."""

    def __init__(self, prompts: Sequence[Sequence[int]], n: int, sampling: Sampling,
                 loop: asyncio.AbstractEventLoop) -> None:
        seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.sampling = sampling
        self.loop = loop
        self.queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        self.choices = [Choice(self, i * n + j, ids, _core.Sampler(seed % 2**64, i * n + j))
                        for i, ids in enumerate(prompts) for j in range(n)]
        self.unstarted = deque(self.choices)
        self.cancelled = False

    def cancel(self, choice: int | None = None) -> None:
        """Stop one choice, or all of them: their slots are freed at the next step."""
        if choice is None:
            self.cancelled = True
        for seq in self.choices:
            if choice is None or seq.choice == choice:
                seq.done = True


def deliver(events: dict[Generation, list[Event]]) -> None:
    """From the scheduler thread: hand each request its events of a step,
    waking each event loop once (not once per request: with 16 streams the
    wake-ups cost more than the events)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Generation, list[Event]]]] = {}
    for gen, evs in events.items():
        by_loop.setdefault(gen.loop, []).append((gen, evs))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_enqueue, batch)
        except RuntimeError:  # the loop has closed: nobody is listening
            for gen, _ in batch:
                gen.cancel()


def _enqueue(batch: list[tuple[Generation, list[Event]]]) -> None:
    for gen, evs in batch:
        gen.queue.put_nowait(evs)


class Scheduler:
    """Decodes the running sequences of all requests together on one model."""

    def __init__(self, model: LoadedModel, max_batch: int = 8, max_queue: int = 64) -> None:
        if max_batch < 1:
            raise UserError(f"--max-batch must be at least 1, got {max_batch}")
        if max_queue < 0:
            raise UserError(f"--max-queue must not be negative, got {max_queue}")
        # a key/value cache per slot, and the logits of a step that decodes every slot
        ensure_memory(model.config.generation_bytes(max_batch, max_batch), f"--max-batch {max_batch:,}",
                      "lower --max-batch")
        with core_refusals():
            model.model.reset_cache(max_batch)
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._free = list(range(max_batch - 1, -1, -1))  # pop() takes the lowest slot
        self._queue: deque[Generation] = deque()  # requests with sequences not started yet
        self._running: list[Choice] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="crystalline-scheduler", daemon=True)

    # -- from the event loop ----------------------------------------------

    def submit(self, prompts: Sequence[Sequence[int]], n: int, sampling: Sampling,
               loop: asyncio.AbstractEventLoop) -> Generation:
        """Queue `n` samples of each prompt (non-empty lists of token ids
        that fit the block size with sampling.max_tokens more)."""
        gen = Generation(prompts, n, sampling, loop)
        with self._cond:
            if self._closed:
                raise Overloaded("the server is shutting down")
            waiting = self._waiting([*self._queue, gen])
            if waiting > self.max_queue:
                raise Overloaded(f"the server is busy: {waiting} requests would wait for its {self.max_batch} "
                                 f"decoding slots, more than --max-queue {self.max_queue}; retry later")
            self._queue.append(gen)
            self._cond.notify()
        return gen

    def _waiting(self, queue: Sequence[Generation]) -> int:
        """Requests of `queue` that cannot start all their sequences in the
        free slots, first come first served."""
        free, waiting = len(self._free), 0
        for gen in queue:
            if gen.cancelled:
                continue
            if waiting or len(gen.unstarted) > free:
                waiting += 1
            else:
                free -= len(gen.unstarted)
        return waiting

    def status(self) -> dict[str, int]:
        with self._cond:
            running = sum(not s.done for s in self._running)
            return {"running": running, "waiting": self._waiting(self._queue), "max_batch": self.max_batch,
                    "max_queue": self.max_queue}

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop after the current step; whatever still runs is dropped."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    # -- the decoding thread ----------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                if not self.step(wait=True):
                    return
            except Exception:  # a bug: answer every request with an error rather than leave it hanging
                log.exception("decoding failed; failing the running requests")
                self._fail_all()

    def step(self, wait: bool = False) -> bool:
        """Free the slots of finished and cancelled sequences, start waiting
        ones in free slots, and decode one token for every running sequence.
        With `wait`, sleep until there is work. False once closed."""
        with self._cond:
            while True:
                self._reap()
                new = self._admit()
                if self._running or self._closed or not wait:
                    break
                self._cond.wait()
            if self._closed:
                return False
            batch = list(self._running)
        if batch:
            self._decode(batch, new)
        return True

    def _reap(self) -> None:
        for seq in self._running:
            if seq.done:
                self._free.append(seq.slot)
        self._running = [s for s in self._running if not s.done]
        self._free.sort(reverse=True)

    def _admit(self) -> list[Choice]:
        new: list[Choice] = []
        while self._queue and self._free:
            gen = self._queue[0]
            if not gen.cancelled:
                seq = gen.unstarted.popleft()
                seq.slot = self._free.pop()
                new.append(seq)
                self._running.append(seq)
            if gen.cancelled or not gen.unstarted:
                self._queue.popleft()
        return new

    def _decode(self, batch: list[Choice], new: list[Choice]) -> None:
        core, tok = self.model.model, self.model.tokenizer
        for seq in new:
            core.clear_sequence(seq.slot)
        prefill = [(seq.slot, t) for seq in new for t in seq.prompt[:-1]]
        if prefill:
            slots, ids = zip(*prefill)
            core.decode(list(slots), np.array(ids, dtype=np.int64), want_logits=False)
        logits = core.decode([s.slot for s in batch], np.array([s.last for s in batch], dtype=np.int64))
        logits[:, tok.vocab_size :] = -np.inf  # ids the tokenizer cannot decode
        events: dict[Generation, list[Event]] = {}
        for seq, row in zip(batch, logits):
            if seq.done:  # cancelled during the step
                continue
            s = seq.request.sampling
            token = seq.sampler.sample(row[None, :], s.temperature, s.top_k, s.top_p)[0]
            out = events.setdefault(seq.request, [])
            if token == tok.eot_id:
                seq.done = True
                out.append(Event(seq.choice, finish=STOP))
                continue
            seq.last = token
            seq.count += 1
            out.append(Event(seq.choice, token=token))
            if seq.count >= s.max_tokens:
                seq.done = True
                out.append(Event(seq.choice, finish=LENGTH))
        deliver(events)

    def _fail_all(self) -> None:
        with self._cond:
            gens = {s.request for s in self._running} | set(self._queue)
            self._queue.clear()
        for gen in gens:
            gen.cancel()
        deliver({gen: [Event(s.choice, finish=ERROR) for s in gen.choices] for gen in gens})
