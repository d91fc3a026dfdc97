"""The Generator deployment: batched, bounded decoding with an injected engine; `Ticket`s stop it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from ray import serve

from services.rag.config import ModelsConfig
from services.rag.stopping import GenerationStopped
from services.serving.config import GeneratorConfig
from services.serving.engine import Emit, EngineFactory, Generated, GenerateRequest, RagEngine
from services.serving.metrics import IN_FLIGHT, QUEUED
from services.serving.replica import reserved_threads, set_batching


class Ticket:
    """A request's claim on the decoding; void once its caller has gone or its deadline passed."""

    def __init__(self, deadline: float | None = None) -> None:
        self.deadline = deadline
        self.cancelled = False

    def void(self) -> bool:
        return self.cancelled or (self.deadline is not None and time.time() >= self.deadline)


@serve.deployment(name="Generator")
class GeneratorDeployment:
    """Answers with an injected engine (`RagEngine` by default): `@serve.batch` groups compatible
    requests into one engine call, which stops once every request in it is void (`Ticket`);
    `stream` answers one request piece by piece. One engine call runs at a time, and a request
    that could not finish by its deadline behind the work held already is refused at once."""

    def __init__(self, config: GeneratorConfig, models: ModelsConfig, engine: EngineFactory = RagEngine):
        self.threads = reserved_threads(config.torch_threads)
        torch.set_num_threads(self.threads)
        self.config = config
        self.engine = engine(models.generator, models.precision)
        self.failure: BaseException | None = None
        self.held = 0  # requests admitted and not yet answered (event loop only)
        self.held_work = 0  # their work (`GenerateRequest.work`)
        self.working = 0  # of those, inside an engine call (engine thread only)
        self.stopped = 0  # engine calls stopped because nobody waited for them any more
        self.seconds_per_work: float | None = None  # measured over the engine calls (moving average)
        self.engine_lock = threading.Lock()
        set_batching(self._batched, config.batch)

    def admit(self, request: GenerateRequest) -> Generated | None:
        """None when the request can finish by its deadline behind the work held (or none is held,
        or nothing is measured yet); else its refusal with the estimated wait."""
        rate = self.seconds_per_work
        if rate is None or request.deadline is None or not self.held:
            return None
        wait = self.held_work * rate
        if time.time() + wait + request.work() * rate <= request.deadline:
            return None
        return Generated("", 0.0, 0, error=f"the work queued ahead takes about {wait:.1f} s", wait_s=wait)

    async def generate(self, request: GenerateRequest) -> Generated:
        """Answer one request; cancelling the call (caller gone, deadline) voids its ticket."""
        refused = self.admit(request)
        if refused is not None:
            return refused
        ticket = Ticket(request.deadline)
        self._hold(request, 1)
        try:
            return await self._batched(request, ticket)
        except asyncio.CancelledError:
            ticket.cancelled = True
            raise
        finally:
            self._hold(request, -1)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[str | Generated]:
        """Answer one request as it decodes: the final pieces of its text, then its `Generated`
        (the refusal alone when it is not admitted). Closing the stream voids its ticket."""
        refused = self.admit(request)
        if refused is not None:
            yield refused
            return
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
        ticket = Ticket(request.deadline)
        self._hold(request, 1)
        decoding = asyncio.ensure_future(
            asyncio.to_thread(
                self._stream_one, request, ticket, partial(loop.call_soon_threadsafe, pieces.put_nowait)
            )
        )
        decoding.add_done_callback(lambda _: (self._hold(request, -1), pieces.put_nowait(None)))
        try:
            while (piece := await pieces.get()) is not None:
                yield piece
            yield await decoding
        finally:  # also when the caller has gone: the decoding stops at its next step
            ticket.cancelled = True

    def _stream_one(self, request: GenerateRequest, ticket: Ticket, emit: Emit) -> Generated:
        if ticket.void():
            return _stopped("before decoding")
        try:
            with self._engine_call([request]) as started:
                answer = self.engine.stream(request, ticket.void, emit)
        except GenerationStopped as stopped:
            return _stopped(str(stopped))
        except ValueError as error:
            return Generated("", 0.0, 1, error=str(error))
        return Generated(answer, (time.perf_counter() - started) * 1000, 1)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _batched(self, requests: list[GenerateRequest], tickets: list[Ticket]) -> list[Generated]:
        return await asyncio.to_thread(self.generate_batch, requests, tickets)

    def _threads(self, batch: int) -> int:
        """All the replica's threads for a batch nobody else waits behind, else its share under load."""
        alone = self.config.torch_threads_alone
        return alone if alone is not None and self.held <= batch else self.threads

    def load(self) -> dict[str, int]:
        """Requests held (queued or decoding), those being decoded now, engine calls stopped."""
        return {"held": self.held, "working": self.working, "stopped": self.stopped}

    def _hold(self, request: GenerateRequest, change: int) -> None:
        self.held += change
        self.held_work += change * request.work()
        self._report()

    def _report(self) -> None:
        tags = {"deployment": "Generator"}
        IN_FLIGHT.set(self.held, tags=tags)
        QUEUED.set(max(0, self.held - self.working), tags=tags)

    def generate_batch(
        self, requests: list[GenerateRequest], tickets: list[Ticket] | None = None
    ) -> list[Generated]:
        """One engine call per group of equal `batch_key()`; results in request order. Requests
        already void are answered `stopped` without decoding."""
        tickets = tickets or [Ticket(r.deadline) for r in requests]
        groups: dict[tuple, list[int]] = defaultdict(list)
        out = [_stopped("before decoding") for _ in requests]
        for i, request in enumerate(requests):
            if not tickets[i].void():
                groups[request.batch_key()].append(i)
        for indices in groups.values():
            group = [(requests[i], tickets[i]) for i in indices]
            for i, result in zip(indices, self._generate_safely(group)):
                out[i] = result
        return out

    def _generate_safely(self, group: list[tuple[GenerateRequest, Ticket]]) -> list[Generated]:
        """One call for the group; if its input is refused (ValueError), one call per request so
        that only the request at fault gets the error."""
        try:
            return self._generate_group(group)
        except ValueError as error:
            if len(group) == 1:
                return [Generated("", 0.0, 1, error=str(error))]
            return [r for member in group for r in self._generate_safely([member])]

    def _generate_group(self, group: list[tuple[GenerateRequest, Ticket]]) -> list[Generated]:
        requests, tickets = [r for r, _ in group], [t for _, t in group]
        try:
            with self._engine_call(requests) as started:
                answers = self.engine.generate(requests, stop=lambda: all(t.void() for t in tickets))
        except GenerationStopped as stopped:
            return [_stopped(str(stopped)) for _ in group]
        elapsed = (time.perf_counter() - started) * 1000
        return [Generated(answer=a, generate_ms=elapsed, batch_size=len(group)) for a in answers]

    @contextmanager
    def _engine_call(self, requests: list[GenerateRequest]) -> Iterator[float]:
        """One engine call at a time, on the replica's threads; yields its start and measures the
        seconds per unit of work of the calls that answer. A broken engine (not bad input, not a
        stop) is kept for check_health, which restarts the replica."""
        with self.engine_lock:
            start = time.perf_counter()
            self.working += len(requests)
            self._report()
            torch.set_num_threads(self._threads(len(requests)))
            try:
                yield start
            except GenerationStopped:
                self.stopped += 1
                raise
            except ValueError:
                raise
            except Exception as error:
                self.failure = error
                raise
            finally:
                self.working -= len(requests)
                self._report()
            sample = (time.perf_counter() - start) / sum(r.work() for r in requests)
            last = self.seconds_per_work
            self.seconds_per_work = sample if last is None else 0.7 * last + 0.3 * sample

    def check_health(self) -> None:
        if self.failure is not None:
            raise self.failure


def _stopped(why: str) -> Generated:
    return Generated("", 0.0, 0, error=why, stopped=True)
