"""The Ray Serve application: Retriever, Generator and Ingress deployments, wired by `build_app`."""

import asyncio
import hmac
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from cluster.shard_group import ShardUnavailableError
from services.serving.api import (
    MAX_BODY_BYTES,
    AnswerRequest,
    AnswerResponse,
    ApiError,
    ChatRequest,
    DecodingOptions,
    RetrieveRequest,
    RetrieveResponse,
    SwapRequest,
    chat_chunks,
    chat_completion,
    parse_request,
    sse,
)
from services.serving.deployments import (
    AppConfig,
    GeneratorDeployment,
    GenerateRequest,
    IngressConfig,
    Retrieved,
    RetrieverDeployment,
    docs_of,
)

ADMIN_TOKEN_ENV = "RAYRAG_ADMIN_TOKEN"

api = FastAPI(
    title="rayrag",
    description="Retrieval-Augmented Generation (Lewis et al. 2020) on Ray Serve. Every answer "
    f"carries its provenance. Limits: body ≤ {MAX_BODY_BYTES} bytes; see the schemas.",
)


@api.exception_handler(ApiError)
async def _api_error(_: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _body_doc(schema: type) -> dict[str, Any]:
    """OpenAPI request-body entry for endpoints that parse the raw body themselves."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": schema.model_json_schema(ref_template="#/components/schemas/{model}")}}}}


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused with 413 once it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(name="Ingress", num_replicas=1, max_ongoing_requests=256,
                  ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    """HTTP front: validation, the API, provenance; calls Retriever then Generator."""

    def __init__(self, retriever: DeploymentHandle, generator: DeploymentHandle,
                 config: IngressConfig):
        # By value: the calls and their results travel over each replica's gRPC server instead
        # of the Ray object store, which halves a hop here (bench/serve.py).
        self.retriever = retriever.options(_by_reference=False)
        self.generator = generator.options(_by_reference=False)
        self.admin_token = config.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None

    async def retrieve(self, question: str, k: int) -> Retrieved:
        """The top-k from the Retriever; 503 naming the shards when none of them can answer."""
        try:
            return await self.retriever.retrieve.remote(question, k)
        except ShardUnavailableError as error:
            raise ApiError(503, f"the index cannot be searched right now: {error}") from error

    async def answer(self, question: str, options: DecodingOptions) -> AnswerResponse:
        """Retrieve, then generate; timings are the replicas' in-process times and the total."""
        start = time.perf_counter()
        found = await self.retrieve(question, options.n_docs)
        generated = await self.generator.generate.remote(GenerateRequest(
            question=question, titles=found.titles, texts=found.texts, doc_scores=found.scores,
            mode=options.mode, decoding=options.decoding, num_beams=options.num_beams,
            max_new_tokens=options.max_new_tokens))
        if generated.error is not None:
            raise ApiError(422, f"question cannot be answered as asked: {generated.error}")
        total = (time.perf_counter() - start) * 1000
        return AnswerResponse(
            answer=generated.answer, mode=options.mode, index_version=found.version,
            index_coverage=found.coverage, docs=docs_of(found),
            timings_ms={"retrieve": found.retrieve_ms, "generate": generated.generate_ms,
                        "total": total})

    @api.post("/v1/answer", response_model=AnswerResponse, openapi_extra=_body_doc(AnswerRequest))
    async def post_answer(self, request: Request) -> AnswerResponse:
        """Answer a question with RAG; the docs it used come with it."""
        body = parse_request(await read_body(request), AnswerRequest)
        return await self.answer(body.question, body)

    @api.post("/v1/retrieve", response_model=RetrieveResponse,
              openapi_extra=_body_doc(RetrieveRequest))
    async def post_retrieve(self, request: Request) -> RetrieveResponse:
        """Top-k passages per question (score as RAG uses it, prob = softmax over the k)."""
        body = parse_request(await read_body(request), RetrieveRequest)
        start = time.perf_counter()
        found = await asyncio.gather(*(self.retrieve(q, body.k) for q in body.all_questions()))
        versions = {f.version for f in found}
        return RetrieveResponse(
            index_version=found[0].version if len(versions) == 1 else ",".join(sorted(versions)),
            index_coverage=min(f.coverage for f in found),
            results=[docs_of(f) for f in found],
            timings_ms={"retrieve": max(f.retrieve_ms for f in found),
                        "total": (time.perf_counter() - start) * 1000})

    @api.post("/v1/chat/completions", openapi_extra=_body_doc(ChatRequest))
    async def post_chat(self, request: Request) -> Any:
        """OpenAI-compatible chat completion: the last user message is the question."""
        body = parse_request(await read_body(request), ChatRequest)
        answer = await self.answer(body.question(), body.options())
        if not body.stream:
            return chat_completion(body, answer)
        return StreamingResponse(iter(sse(chat_chunks(body, answer))),
                                 media_type="text/event-stream")

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """Live replicas per shard and the index version; 503 when a shard has none."""
        health = await self.retriever.health.remote()
        return JSONResponse(health, status_code=200 if health["ok"] else 503)

    @api.get("/v1/index")
    async def index(self) -> dict[str, Any]:
        """The served index: version, passages, shards, and the versions on disk."""
        return await self.retriever.index_info.remote()

    @api.post("/v1/admin/index/swap", openapi_extra=_body_doc(SwapRequest))
    async def swap(self, request: Request) -> dict[str, Any]:
        """Swap every Retriever replica to `version` (Authorization: Bearer <token>)."""
        self._authorize(request.headers.get("authorization", ""))
        body = parse_request(await read_body(request), SwapRequest)
        info = await self.retriever.index_info.remote()
        if body.version not in info["versions"]:
            raise ApiError(404, f"version {body.version!r} is not in the index root; "
                                f"have {info['versions']}", "version")
        served = await self.retriever.broadcast("swap", body.version).results_async()
        return {"version": body.version, "replicas": len(served), "previous": info["version"]}

    def _authorize(self, header: str) -> None:
        if not self.admin_token:
            raise ApiError(403, f"admin calls are disabled: no admin token configured "
                                f"(args.admin_token or ${ADMIN_TOKEN_ENV})")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "admin calls need 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(token.strip().encode(), self.admin_token.encode()):
            raise ApiError(403, "admin token is wrong")


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder: `serve run deploy.yaml` (import_path services.serving.app:build_app)."""
    config = AppConfig.from_args(args)
    if config.ingress.admin_token is None and os.environ.get(ADMIN_TOKEN_ENV):
        config.ingress.admin_token = os.environ[ADMIN_TOKEN_ENV]
    retriever = RetrieverDeployment.options(**config.retriever.deployment_options()).bind(
        config.retriever)
    generator = GeneratorDeployment.options(**config.generator.deployment_options()).bind(
        config.generator)
    return Ingress.bind(retriever, generator, config.ingress)
