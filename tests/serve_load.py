"""The Serve app under bounded HTTP load on 127.0.0.1, for the tests and benches: closed-loop load
with every answer recorded, Serve's replica counts, waits on conditions, shard kills, autoscaling."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import numpy as np

from bench.serve import free_port

# Serve's autoscaling on a short clock: one extra Generator replica while requests queue, gone a few
# seconds after they stop. Metrics every 0.5 s averaged over 2 s; act after 1 s up, 3 s down.
FAST_AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 1,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2.0,
    "upscale_delay_s": 1.0,
    "downscale_delay_s": 3.0,
}


@dataclass(frozen=True)
class Outcome:
    """One /v1/answer request: when it was sent and answered (monotonic s), its status (0: no HTTP
    answer) and, when answered, the index version, coverage and the texts of its docs."""

    sent_s: float
    done_s: float
    status: int
    version: str | None = None
    coverage: float | None = None
    texts: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def latency_ms(self) -> float:
        return (self.done_s - self.sent_s) * 1000


class Load:
    """Closed-loop load on /v1/answer: `concurrency` threads each send the next question when their
    last one is answered, until `stop()`, `max_requests` sent or `max_s` seconds. `outcomes` are in
    completion order."""

    def __init__(
        self,
        url: str,
        questions: list[str],
        body: dict,
        concurrency: int,
        max_requests: int,
        max_s: float = 600.0,
    ) -> None:
        if concurrency < 1 or max_requests < 1:
            raise ValueError(f"concurrency and max_requests must be ≥ 1, got {concurrency}, {max_requests}")
        self.url, self.questions, self.body = url, questions, body
        self.max_requests, self.deadline = max_requests, time.monotonic() + max_s
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._sent = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(concurrency)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        """Send nothing more, wait for the requests in flight; every outcome in completion order."""
        self._stop.set()
        for thread in self._threads:
            thread.join()
        return list(self.outcomes)

    def answered(self) -> int:
        return len(self.outcomes)

    def wait_for(self, count: int, timeout_s: float) -> None:
        """Until `count` requests have been answered (or failed)."""
        wait_until(lambda: self.answered() >= count, timeout_s, f"{count} answers under load")

    def _next_question(self) -> str | None:
        with self._lock:
            if self._stop.is_set() or self._sent >= self.max_requests or time.monotonic() > self.deadline:
                return None
            self._sent += 1
            return self.questions[self._sent % len(self.questions)]

    def _worker(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while (question := self._next_question()) is not None:
                outcome = _ask(client, {**self.body, "question": question})
                with self._lock:
                    self.outcomes.append(outcome)


def _ask(client: httpx.Client, body: dict) -> Outcome:
    sent = time.monotonic()
    try:
        response = client.post("/v1/answer", json=body)
    except httpx.HTTPError:
        return Outcome(sent, time.monotonic(), 0)
    done = time.monotonic()
    if response.status_code != 200:
        return Outcome(sent, done, response.status_code)
    answer = response.json()
    texts = tuple(doc["text"] for doc in answer["docs"])
    return Outcome(sent, done, 200, answer["index_version"], answer["index_coverage"], texts)


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1) -> float:
    """Poll `predicate` until it holds; the seconds that took. TimeoutError naming `what` after
    `timeout_s`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(poll_s)
    return time.monotonic() - start


def start_serve() -> str:
    """Start Serve on a free 127.0.0.1 port with deploy.yaml's controller options; its URL."""
    from ray import serve

    from services.serving.serve_file import read_serve_file

    port = free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port},
        controller_options=read_serve_file().controller_options or None,
    )
    return f"http://127.0.0.1:{port}"


def replica_states(app: str, deployment: str) -> dict[str, int]:
    """Serve's replica count per state (RUNNING, STARTING, STOPPING, …) of one deployment."""
    from ray import serve

    application = serve.status().applications.get(app)
    if application is None or deployment not in application.deployments:
        return {}
    return dict(application.deployments[deployment].replica_states)


@dataclass(frozen=True)
class Autoscaled:
    """Seconds from the start of the load until Serve added a Generator replica (decided) and until
    two were RUNNING; from the end of the load until one was stopping and until only one was left."""

    up_decided_s: float
    up_s: float
    down_decided_s: float
    down_s: float
    outcomes: list[Outcome]


def measure_autoscaling(app: str, load: Callable[[], Load], timeout_s: float = 120) -> Autoscaled:
    """Apply `load()` from one RUNNING Generator replica until two run, stop it, wait until one is
    left; TimeoutError when a step takes over `timeout_s`."""
    states = lambda: replica_states(app, "Generator")
    running = lambda: states().get("RUNNING", 0)
    wait_until(lambda: states() == {"RUNNING": 1}, timeout_s, "one Generator replica before the load")
    with load() as applied:
        up_decided_s = wait_until(
            lambda: sum(states().values()) >= 2, timeout_s, "a second Generator replica"
        )
        up_s = up_decided_s + wait_until(lambda: running() >= 2, timeout_s, "two RUNNING Generator replicas")
        outcomes = applied.stop()
    down_decided_s = wait_until(
        lambda: running() < 2, timeout_s, "a Generator replica stopping after the load"
    )
    down_s = down_decided_s + wait_until(
        lambda: states() == {"RUNNING": 1}, timeout_s, "one Generator replica after the load"
    )
    return Autoscaled(up_decided_s, up_s, down_decided_s, down_s, outcomes)


def shard_replicas(client: httpx.Client) -> list[list[dict]]:
    """Per shard, per replica: state and pid, from /healthz (which answers 503 when a shard is down)."""
    return client.get("/healthz").json()["shards"]


def kill_shard_replica(client: httpx.Client, shard: int) -> int:
    """SIGKILL the process of one ready replica of `shard` (a Ray actor of this app); its pid."""
    ready = [r["pid"] for r in shard_replicas(client)[shard] if r["state"] == "ready"]
    if not ready:
        raise ValueError(f"shard {shard} has no ready replica to kill")
    os.kill(ready[0], signal.SIGKILL)
    return ready[0]


def all_replicas_ready_without(client: httpx.Client, pid: int) -> bool:
    """Every replica of every shard ready, and none of them the process `pid` (killed, restarted)."""
    return all(r["state"] == "ready" and r["pid"] != pid for row in shard_replicas(client) for r in row)


def sent_between(outcomes: list[Outcome], start: float, end: float = float("inf")) -> list[Outcome]:
    return [o for o in outcomes if start <= o.sent_s < end]


def latency_stats(outcomes: list[Outcome]) -> dict:
    """Requests, failures (any status but 200) and p50/p99 latency of the answered ones."""
    latencies = [o.latency_ms for o in outcomes if o.ok]
    return {
        "requests": len(outcomes),
        "failed": sum(not o.ok for o in outcomes),
        "p50_ms": float(np.percentile(latencies, 50)) if latencies else None,
        "p99_ms": float(np.percentile(latencies, 99)) if latencies else None,
    }


def version_regressions(outcomes: list[Outcome]) -> int:
    """Answers (in completion order) citing an older version than an earlier answer did."""
    newest, regressions = "", 0
    for outcome in outcomes:
        if outcome.ok:
            regressions += outcome.version < newest
            newest = max(newest, outcome.version)
    return regressions


def mixed_version_answers(outcomes: list[Outcome], texts_by_version: dict[str, set[str]]) -> int:
    """Answers with a doc that is not a passage of the version the answer names."""
    return sum(o.ok and not set(o.texts) <= texts_by_version.get(o.version, set()) for o in outcomes)
