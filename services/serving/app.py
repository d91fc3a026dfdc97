"""The Ray Serve app: the Ingress and its FastAPI routes over Retriever and Generator; `build_app`."""

import asyncio
import hmac
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request, Security
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.serve import Application
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cluster.shard_group import ShardUnavailableError
from services.rag.retrieval import Retrieved
from services.serving.api import (
    DONE,
    ERROR_HANDLERS,
    MAX_BODY_BYTES,
    AnswerRequest,
    AnswerResponse,
    ApiError,
    BodyLimit,
    ChatRequest,
    DecodingOptions,
    RetrieveRequest,
    RetrieveResponse,
    SwapRequest,
    chat_completion,
    chunk,
    chunk_base,
    error_body,
    event,
    first_chunk,
    last_chunks,
    responses,
)
from services.serving.config import AppConfig, LimitsConfig
from services.serving.conversation import generator_question, retrieval_query
from services.serving.engine import EngineFactory, Generated, GenerateRequest, RagEngine
from services.serving.generator_deployment import GeneratorDeployment
from services.serving.metrics import LATENCY_MS, REQUESTS
from services.serving.provenance import docs_of
from services.serving.retriever_deployment import RetrieverDeployment

ADMIN_TOKEN_ENV = "RAYRAG_ADMIN_TOKEN"
T = TypeVar("T")


@dataclass
class OpenStream:
    """A streamed answer whose first piece has come: its passages, that piece, the rest to come."""

    found: Retrieved
    first: str | Generated
    rest: Any  # the Generator's stream (a DeploymentResponseGenerator): `__anext__`, `cancel`
    start: float  # perf_counter() when the request came
    mode: str


@contextmanager
def _stage(route: str, stage: str) -> Iterator[None]:
    """Time one stage of a request into LATENCY_MS, tagged with how it ended."""
    start, status = time.perf_counter(), "cancelled"
    try:
        yield
        status = "200"
    except ApiError as error:
        status = str(error.status)
        raise
    finally:
        elapsed = (time.perf_counter() - start) * 1000
        LATENCY_MS.observe(elapsed, tags={"route": route, "stage": stage, "status": status})


class Ingress:
    """What the HTTP routes do: retrieve, generate, assemble provenance, swap; no Serve needed.

    `retriever` and `generator` are the deployments' handles (or stand-ins with the same
    methods: `retrieve`, `health`, `index_info`, `swap` broadcast; `generate`).
    """

    def __init__(
        self,
        retriever: DeploymentHandle,
        generator: DeploymentHandle,
        limits: LimitsConfig,
        admin_token: str | None = None,
    ):
        # By value: the calls and their results travel over each replica's gRPC server instead
        # of the Ray object store, which halves a hop here (bench/serve.py).
        self.retriever = retriever.options(_by_reference=False)
        self.generator = generator.options(_by_reference=False)
        self.admin_token = admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None
        self.limits = limits

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this on each replica, after `__init__`, for the app it serves."""
        return build_api(self)

    async def _call(self, deployment: str, call: Awaitable[T]) -> T:
        """Await a deployment call; 503 with Retry-After when its queue is full."""
        try:
            return await call
        except BackPressureError as error:
            retry = self.limits.retry_after_s
            raise ApiError(
                503,
                f"the {deployment} is at capacity ({error}); retry after {retry} s",
                headers={"Retry-After": str(retry)},
            ) from error

    async def retrieve(self, question: str, k: int, retriever: str | None = None) -> Retrieved:
        """The question's top-k (a batch of one) from the Retriever (`retriever`: None for the
        server's); 503 naming the shards when none of them can answer."""
        try:
            return await self._call("Retriever", self.retriever.retrieve.remote(question, k, retriever))
        except ShardUnavailableError as error:
            raise ApiError(503, f"the index cannot be searched right now: {error}") from error

    def check_work(self, options: DecodingOptions) -> None:
        """422 when the decoding asked for is over the server's work limit."""
        work = options.n_docs * options.num_beams * options.max_new_tokens
        if work > self.limits.max_request_work:
            raise ApiError(
                422,
                f"n_docs × num_beams × max_new_tokens = {options.n_docs} × {options.num_beams} × "
                f"{options.max_new_tokens} = {work} is over this server's limit of "
                f"{self.limits.max_request_work} (args.limits.max_request_work); ask for less",
            )

    async def answer(
        self, question: str, options: DecodingOptions, route: str, query: str | None = None
    ) -> AnswerResponse:
        """Retrieve for `query` (default: the question), then generate, within the work limit and
        the deadline (504 past it)."""
        self.check_work(options)
        timeout = self.limits.request_timeout_s
        answering = self._answer(question, query or question, options, route, deadline=time.time() + timeout)
        try:
            return await asyncio.wait_for(answering, timeout)
        except asyncio.TimeoutError as error:
            message = f"no answer within the deadline of {timeout:g} s; its decoding was stopped"
            raise ApiError(504, message) from error

    def _generate_request(
        self, question: str, found: Retrieved, options: DecodingOptions, deadline: float
    ) -> GenerateRequest:
        return GenerateRequest(
            question=question,
            titles=found.titles[0],
            texts=found.texts[0],
            doc_scores=found.doc_scores[0].tolist(),
            options=options,
            deadline=deadline,
        )

    def _checked(self, generated: Generated) -> Generated:
        """503 with Retry-After when the Generator refused it, 504 when stopped, 422 on bad input."""
        if generated.wait_s is not None:
            retry = max(1, math.ceil(generated.wait_s))
            message = (
                f"the Generator cannot answer before the deadline ({generated.error}); retry in {retry} s"
            )
            raise ApiError(503, message, headers={"Retry-After": str(retry)})
        if generated.stopped:
            raise ApiError(504, f"no answer within the deadline: {generated.error}")
        if generated.error is not None:
            raise ApiError(422, f"question cannot be answered as asked: {generated.error}")
        return generated

    def _response(self, found: Retrieved, generated: Generated, mode: str, start: float) -> AnswerResponse:
        """Timings are the replicas' in-process times and the total."""
        return AnswerResponse(
            answer=generated.answer,
            mode=mode,
            index_version=found.version,
            index_coverage=found.coverage,
            docs=docs_of(found),
            timings_ms={
                "retrieve": found.retrieve_ms,
                "generate": generated.generate_ms,
                "total": (time.perf_counter() - start) * 1000,
            },
        )

    async def _answer(
        self, question: str, query: str, options: DecodingOptions, route: str, deadline: float
    ) -> AnswerResponse:
        start = time.perf_counter()
        with _stage(route, "retrieve"):
            found = await self.retrieve(query, options.n_docs, options.retriever)
        request = self._generate_request(question, found, options, deadline)
        with _stage(route, "generate"):
            generated = self._checked(await self._call("Generator", self.generator.generate.remote(request)))
        return self._response(found, generated, options.mode, start)

    async def open_stream(
        self, question: str, options: DecodingOptions, route: str, query: str | None = None
    ) -> OpenStream:
        """Retrieve, then start the Generator's stream and wait for its first piece, so that a
        refusal, bad input or the deadline still answer with their status (503, 422, 504)."""
        self.check_work(options)
        start, timeout = time.perf_counter(), self.limits.request_timeout_s
        deadline = time.time() + timeout
        try:
            with _stage(route, "retrieve"):
                found = await asyncio.wait_for(
                    self.retrieve(query or question, options.n_docs, options.retriever), timeout
                )
            request = self._generate_request(question, found, options, deadline)
            rest = self.generator.options(stream=True).stream.remote(request)
            try:
                with _stage(route, "first_piece"):
                    first = await asyncio.wait_for(
                        self._call("Generator", rest.__anext__()), deadline - time.time()
                    )
                if isinstance(first, Generated):
                    self._checked(first)
            except BaseException:
                rest.cancel()
                raise
        except asyncio.TimeoutError as error:
            raise ApiError(
                504, f"no answer within the deadline of {timeout:g} s; its decoding was stopped"
            ) from error
        return OpenStream(found, first, rest, start, options.mode)

    async def chat_events(self, request: ChatRequest, opened: OpenStream) -> AsyncIterator[str]:
        """The server-sent events of an opened stream: role, each final piece of text, then the
        citation marks and the stop chunk with the docs (or an error event if the decoding
        stopped). Closing it (the client left) stops the decoding at its next step."""
        base, item = chunk_base(request), opened.first
        try:
            yield event(first_chunk(base))
            while isinstance(item, str):
                yield event(chunk(base, {"content": item}))
                item = await opened.rest.__anext__()
            if item.error is None:
                for last in last_chunks(base, self._response(opened.found, item, opened.mode, opened.start)):
                    yield event(last)
            else:
                yield event(error_body(504 if item.stopped else 422, item.error))
            yield DONE
        finally:
            opened.rest.cancel()

    async def retrieve_many(
        self, questions: list[str], k: int, retriever: str | None = None
    ) -> RetrieveResponse:
        """Top-k per question, searched concurrently; versions are joined if a swap fell between."""
        start = time.perf_counter()
        with _stage("/v1/retrieve", "retrieve"):
            found = await asyncio.gather(*(self.retrieve(q, k, retriever) for q in questions))
        versions = {f.version for f in found}
        return RetrieveResponse(
            index_version=found[0].version if len(versions) == 1 else ",".join(sorted(versions)),
            index_coverage=min(f.coverage for f in found),
            results=[docs_of(f) for f in found],
            timings_ms={
                "retrieve": max(f.retrieve_ms for f in found),
                "total": (time.perf_counter() - start) * 1000,
            },
        )

    async def swap(self, version: str) -> dict[str, Any]:
        """Swap every Retriever replica to `version`; 404 when the index root lacks it."""
        info = await self.retriever.index_info.remote()
        if version not in info["versions"]:
            raise ApiError(
                404, f"version {version!r} is not in the index root; have {info['versions']}", "version"
            )
        served = await self.retriever.broadcast("swap", version).results_async()
        return {"version": version, "replicas": len(served), "previous": info["version"]}

    def authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        """403 when admin calls are off or the token is wrong, 401 when none is given."""
        if not self.admin_token:
            raise ApiError(
                403,
                f"admin calls are disabled: no admin token configured "
                f"(args.admin_token or ${ADMIN_TOKEN_ENV})",
            )
        if credentials is None or not credentials.credentials.strip():
            raise ApiError(401, "admin calls need 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(credentials.credentials.strip().encode(), self.admin_token.encode()):
            raise ApiError(403, "admin token is wrong")


def _ingress(request: Request) -> Ingress:
    return request.app.state.ingress


Backend = Annotated[Ingress, Depends(_ingress)]
bearer = HTTPBearer(auto_error=False, description=f"the admin token (args.admin_token or ${ADMIN_TOKEN_ENV})")
BODY_ERRORS = (400, 413, 415, 422)
router = APIRouter()


@router.post("/v1/answer", responses=responses(*BODY_ERRORS, 503, 504))
async def post_answer(body: AnswerRequest, ingress: Backend) -> AnswerResponse:
    """Answer a question with RAG; the docs it used come with it."""
    return await ingress.answer(body.question, body, "/v1/answer")


@router.post("/v1/retrieve", responses=responses(*BODY_ERRORS, 503))
async def post_retrieve(body: RetrieveRequest, ingress: Backend) -> RetrieveResponse:
    """Top-k passages per question (score as RAG uses it, prob = softmax over the k)."""
    return await ingress.retrieve_many(body.all_questions(), body.k, body.retriever)


CHAT_OK = {
    200: {
        "description": "A `chat.completion` object with `docs` and `citations`; with "
        "`stream: true`, `chat.completion.chunk` server-sent events.",
        "content": {"application/json": {}, "text/event-stream": {}},
    }
}


@router.post("/v1/chat/completions", responses={**CHAT_OK, **responses(*BODY_ERRORS, 503, 504)})
async def post_chat(body: ChatRequest, ingress: Backend) -> Any:
    """OpenAI-compatible chat completion: the last user message is the question; earlier turns
    guide retrieval and reach the generator (services/serving/conversation.py)."""
    turns = body.turns()
    question, query = generator_question(turns), retrieval_query(turns)
    if body.stream:
        opened = await ingress.open_stream(question, body.options(), "/v1/chat/completions", query)
        return StreamingResponse(ingress.chat_events(body, opened), media_type="text/event-stream")
    answer = await ingress.answer(question, body.options(), "/v1/chat/completions", query)
    return chat_completion(body, answer)


@router.get("/healthz", responses={503: {"description": "A shard has no live replica (same report)."}})
async def healthz(ingress: Backend) -> JSONResponse:
    """Live replicas per shard and the index version; 503 when a shard has none."""
    health = await ingress.retriever.health.remote()
    return JSONResponse(health, status_code=200 if health["ok"] else 503)


@router.get("/v1/index")
async def index(ingress: Backend) -> dict[str, Any]:
    """The served index: version, passages, shards, and the versions on disk."""
    return await ingress.retriever.index_info.remote()


async def _admin(
    ingress: Backend, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
) -> None:
    """Runs before the body is validated, so a caller without the token learns nothing more."""
    ingress.authorize(credentials)


@router.post(
    "/v1/admin/index/swap", dependencies=[Depends(_admin)], responses=responses(401, 403, 404, *BODY_ERRORS)
)
async def swap(body: SwapRequest, ingress: Backend) -> dict[str, Any]:
    """Swap every Retriever replica to `version` (Authorization: Bearer <token>)."""
    return await ingress.swap(body.version)


class RequestMetrics:
    """ASGI middleware: counts every request by route and status and times it (stage "total");
    paths that are not routes count as "other", requests whose client left as "cancelled"."""

    def __init__(self, app: ASGIApp, routes: set[str]):
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"
        start, status = time.perf_counter(), "cancelled"

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            status = "500"
            raise
        finally:
            tags = {"route": route, "status": status}
            REQUESTS.inc(tags=tags)
            LATENCY_MS.observe((time.perf_counter() - start) * 1000, tags={**tags, "stage": "total"})


def build_api(ingress: Ingress) -> FastAPI:
    """The FastAPI app over `ingress`: routes, error bodies, the body-size limit."""
    api = FastAPI(
        title="rayrag",
        exception_handlers=ERROR_HANDLERS,
        description="Retrieval-Augmented Generation (Lewis et al. 2020) on Ray Serve. Every "
        f"answer carries its provenance. Limits: body ≤ {MAX_BODY_BYTES} bytes; see the schemas.",
    )
    api.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    api.add_middleware(RequestMetrics, routes={route.path for route in router.routes})
    api.include_router(router)
    api.state.ingress = ingress
    return api


IngressDeployment = serve.deployment(
    name="Ingress", num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0}
)(serve.ingress()(Ingress))


def build_app(args: dict[str, Any], engine: EngineFactory = RagEngine) -> Application:
    """Serve application builder: `serve run deploy.yaml` (import_path services.serving.app:build_app);
    `engine` builds the Generator's engine (Serve passes only `args`)."""
    config = AppConfig.parse(args or {}, "args.")
    retriever = RetrieverDeployment.options(**config.retriever.deployment_options()).bind(
        config.retriever, config.index, config.models, config.retrieval
    )
    generator = GeneratorDeployment.options(**config.generator.deployment_options()).bind(
        config.generator, config.models, engine
    )
    admin_token = config.admin_token or os.environ.get(ADMIN_TOKEN_ENV)
    return IngressDeployment.bind(retriever, generator, config.limits, admin_token)
