"""The HTTP API of the Serve app: request/response schemas, their limits, error bodies, citations."""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cluster.fusion import Retriever
from services.rag.config import DecodingConfig
from services.serving.conversation import Turn, conversation

# Documented limits (also shown in the OpenAPI schema at /docs).
MAX_BODY_BYTES = 64 * 1024
MAX_QUESTION_CHARS = 2000
MAX_N_DOCS = 50
MAX_NUM_BEAMS = 8
MAX_NEW_TOKENS = 256
MAX_BATCH_QUESTIONS = 32
MAX_MESSAGES = 1024  # older turns beyond the generator's budget are left out


class ErrorDetail(BaseModel):
    message: str = Field(..., description="what is wrong, naming the field or the limit")
    type: Literal["invalid_request_error", "server_error"]
    param: str | None = Field(None, description="the field at fault, as a dotted path")
    code: int = Field(..., description="the HTTP status")


class ErrorResponse(BaseModel):
    """OpenAI-style error body, so OpenAI clients show the message."""

    error: ErrorDetail


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=status)).model_dump()


def error_response(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


class ApiError(Exception):
    """An error the app answers with: HTTP status plus a message naming the problem."""

    def __init__(
        self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers


def _question(value: str) -> str:
    if len(value) > MAX_QUESTION_CHARS:
        raise ValueError(f"question is {len(value)} characters; the limit is {MAX_QUESTION_CHARS}")
    value = value.strip()
    if not value:
        raise ValueError("question must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"question is not valid Unicode (lone surrogate at {error.start})") from error
    return value


Question = Annotated[
    str,
    AfterValidator(_question),
    Field(
        description=f"1 to {MAX_QUESTION_CHARS} characters, not all white space",
        # documented here, checked by _question (whose messages say more than the schema's)
        json_schema_extra={"minLength": 1, "maxLength": MAX_QUESTION_CHARS, "pattern": r"\S"},
    ),
]


def _limited(name: str, most: int) -> Any:
    """The decoding config's field `name` (its default and description) with this API's upper limit."""
    return FieldInfo.merge_field_infos(DecodingConfig.model_fields[name], Field(le=most))


class DecodingOptions(DecodingConfig):
    """How to decode (the decoding config, within this API's limits), and which retriever finds the
    passages."""

    n_docs: int = _limited("n_docs", MAX_N_DOCS)
    num_beams: int = _limited("num_beams", MAX_NUM_BEAMS)
    max_new_tokens: int = _limited("max_new_tokens", MAX_NEW_TOKENS)
    retriever: Retriever | None = Field(
        None, description="dense, bm25 or hybrid (default: the server's args.retrieval.retriever)"
    )


class AnswerRequest(DecodingOptions):
    question: Question


class RetrieveRequest(BaseModel):
    """One `question` or a list `questions`; `k` passages each."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={  # exactly one of the two is given (not null)
            "oneOf": [
                {"required": ["question"], "properties": {"question": {"type": "string"}}},
                {"required": ["questions"], "properties": {"questions": {"type": "array"}}},
            ]
        },
    )
    question: Question | None = None
    questions: list[Question] | None = Field(None, min_length=1, max_length=MAX_BATCH_QUESTIONS)
    k: int = Field(5, ge=1, le=MAX_N_DOCS)
    retriever: Retriever | None = Field(
        None, description="dense, bm25 or hybrid (default: the server's args.retrieval.retriever)"
    )

    @model_validator(mode="after")
    def _one_of(self) -> RetrieveRequest:
        if (self.question is None) == (self.questions is None):
            raise ValueError("give exactly one of 'question' or 'questions'")
        return self

    def all_questions(self) -> list[str]:
        return [self.question] if self.question is not None else list(self.questions or [])


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message text; OpenAI content parts of type "text" are joined."""
        if isinstance(self.content, list):
            return " ".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


STREAM_DEFAULTS = {"mode": "token", "decoding": "fast", "num_beams": 1}  # greedy RAG-Token


class ChatRequest(DecodingOptions):
    """OpenAI chat completion request: the last user message is the question, and the turns before
    it count as services/serving/conversation.py says (system messages are ignored).

    OpenAI's sampling fields (temperature, top_p, ...) are accepted and ignored: answers come
    from RAG beam search. `max_tokens` / `max_completion_tokens` set `max_new_tokens`.

    With `stream: true` and none of mode, decoding, num_beams given, the answer is decoded by
    greedy RAG-Token (`STREAM_DEFAULTS`), whose tokens are final as soon as they are chosen; the
    same request with those fields and without `stream` answers the same text. Every chunk's
    text is final; the last chunk carries the docs and citations.
    """

    model_config = ConfigDict(extra="ignore")
    model: str = "rayrag"
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)

    @field_validator("messages")
    @classmethod
    def _asks_a_question(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        _question(_turns(messages)[-1].text)
        return messages

    def turns(self) -> list[Turn]:
        """The conversation's user and assistant turns, ending with the question."""
        *earlier, question = _turns(self.messages)
        return [*earlier, Turn("user", _question(question.text))]

    def options(self) -> DecodingOptions:
        limit = self.max_completion_tokens or self.max_tokens or self.max_new_tokens
        decoding = {"mode": self.mode, "decoding": self.decoding, "num_beams": self.num_beams}
        if self.stream and not self.model_fields_set & set(decoding):
            decoding = STREAM_DEFAULTS
        return DecodingOptions(n_docs=self.n_docs, max_new_tokens=limit, retriever=self.retriever, **decoding)


def _turns(messages: list[ChatMessage]) -> list[Turn]:
    return conversation([(m.role, m.text()) for m in messages])


class Doc(BaseModel):
    id: int
    title: str
    text: str
    score: float = Field(
        ...,
        description="doc score as RAG uses it, the logit of p(z|x): scale · q(x)·d(z) (dense, hybrid) "
        "or BM25 / temperature (bm25)",
    )
    prob: float = Field(..., description="p(z|x): softmax of the scores over the K docs")
    retriever: str = Field("dense", description="what found it: dense, bm25 or dense+bm25 (hybrid)")
    dense_score: float | None = Field(None, description="q(x)·d(z) where the dense retriever found it")
    bm25_score: float | None = Field(None, description="BM25 score where the BM25 retriever found it")
    fused_score: float | None = Field(
        None, description="hybrid: the fusion value it was ranked by (RRF or min-max mix), not a similarity"
    )


class Timings(BaseModel):
    retrieve: float
    generate: float
    total: float


COVERAGE = Field(
    ...,
    description="fraction of the index's shards that answered; below 1 a shard "
    "was down and its passages could not be retrieved",
)


class AnswerResponse(BaseModel):
    answer: str
    mode: str
    index_version: str
    index_coverage: float = COVERAGE
    docs: list[Doc]
    timings_ms: Timings


class RetrieveResponse(BaseModel):
    index_version: str
    index_coverage: float = COVERAGE
    results: list[list[Doc]]
    timings_ms: dict[str, float]


class SwapRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")


ERRORS = {
    400: "The body is not JSON, not UTF-8, empty, or not a JSON object.",
    401: "No 'Authorization: Bearer <token>' header.",
    403: "Admin calls are disabled (no token configured) or the token is wrong.",
    404: "The index version is not in the index root.",
    413: f"The body is over {MAX_BODY_BYTES} bytes.",
    415: "The body is not sent as application/json.",
    422: "A field is missing, unknown or out of range (the message names it), the request asks for "
    "more work (n_docs × num_beams × max_new_tokens) than the server's limit, or the generator "
    "cannot decode the question as asked.",
    503: "No shard of the index can answer right now (the message names them), the queues are "
    "full, or the work queued ahead would not let the answer finish before its deadline: retry "
    "after the `Retry-After` header's seconds.",
    504: "No answer within the server's deadline (args.limits.request_timeout_s); its decoding was stopped.",
}


RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying (the queues are full, or the work ahead "
        "takes about that long).",
        "schema": {"type": "integer"},
    }
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error statuses a route can answer with."""
    return {
        status: {"model": ErrorResponse, "description": ERRORS[status]}
        | ({"headers": RETRY_AFTER} if status == 503 else {})
        for status in statuses
    }


_JSON_TYPES = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def _body_error(error: dict[str, Any], body: Any, content_type: str | None) -> tuple[int, str]:
    """Status and message when the body as a whole is refused (loc == ("body",))."""
    if error["type"] == "missing":
        return 400, "body is empty; expected a JSON object"
    if isinstance(error["input"], bytes):
        return 415, f"body must be sent as application/json, got content-type {content_type!r}"
    if error["type"] == "model_attributes_type":
        return 400, f"body must be a JSON object, got {_JSON_TYPES.get(type(body), 'a value')}"
    return 422, "body: " + error["msg"].removeprefix("Value error, ")


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 naming the first bad field; 400/415 when the body itself is not a JSON object."""
    first = error.errors()[0]
    loc = first["loc"][1:] if first["loc"][:1] == ("body",) else first["loc"]
    if first["type"] == "json_invalid":
        doc, pos = error.body, loc[0]
        line, column = doc.count("\n", 0, pos) + 1, pos - doc.rfind("\n", 0, pos)
        return error_response(
            400, f"body is not valid JSON: {first['ctx']['error']} at line {line} column {column}"
        )
    if not loc:
        status, message = _body_error(first, error.body, request.headers.get("content-type"))
        return error_response(status, message)
    where = ".".join(str(p) for p in loc)
    more = f" (and {len(error.errors()) - 1} more)" if len(error.errors()) > 1 else ""
    return error_response(422, f"{where}: {first['msg'].removeprefix('Value error, ')}{more}", where)


async def _http_error(_: Request, error: HTTPException) -> JSONResponse:
    """Starlette/FastAPI HTTP errors (body limit, undecodable body, 404, 405) in the API's shape."""
    message = str(error.detail)
    if isinstance(error.__cause__, UnicodeDecodeError):  # FastAPI's 400 "error parsing the body"
        message = f"body is not valid UTF-8 (byte {error.__cause__.start})"
    return error_response(error.status_code, message, headers=error.headers)


async def _api_error(_: Request, error: ApiError) -> JSONResponse:
    return error_response(error.status, error.message, error.param, error.headers)


ERROR_HANDLERS = {RequestValidationError: _validation_error, HTTPException: _http_error, ApiError: _api_error}


class BodyLimit:
    """ASGI middleware: 413 once a request body passes `limit` bytes, by its Content-Length
    before any of it is read, or by the bytes counted as it streams in."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            refusal = error_response(413, f"body is {declared} bytes; the limit is {self.limit}")
            return await refusal(scope, receive, send)
        size = 0

        async def counted() -> Message:
            nonlocal size
            message = await receive()
            size += len(message.get("body", b""))
            if size > self.limit:  # raised inside the route's body read: ERROR_HANDLERS answer it
                raise HTTPException(413, f"body is over the limit of {self.limit} bytes")
            return message

        await self.app(scope, counted, send)


def cited(answer: str, docs: list[Doc]) -> tuple[str, list[int]]:
    """Answer text with citation marks [i] (1-based, into `docs`).

    Cites the docs whose text contains the answer (case-insensitive); when none does, the
    most probable doc, the one the answer most likely came from under p(z|x).
    """
    needle = answer.strip().lower()
    marks = [i + 1 for i, d in enumerate(docs) if needle and needle in d.text.lower()]
    if not marks and docs:
        marks = [max(range(len(docs)), key=lambda i: docs[i].prob) + 1]
    return answer.strip() + "".join(f" [{i}]" for i in marks), marks


def chat_completion(request: ChatRequest, answer: AnswerResponse) -> dict[str, Any]:
    """The OpenAI `chat.completion` object, with the docs and provenance as extra fields."""
    content, marks = cited(answer.answer, answer.docs)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
        ],
        "usage": None,
        **_extras(answer, marks),
    }


def chunk_base(request: ChatRequest) -> dict[str, Any]:
    """The fields every `chat.completion.chunk` of one answer shares."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": request.model,
    }


def chunk(base: dict[str, Any], delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def first_chunk(base: dict[str, Any]) -> dict[str, Any]:
    return chunk(base, {"role": "assistant", "content": ""})


def last_chunks(base: dict[str, Any], answer: AnswerResponse) -> list[dict[str, Any]]:
    """What follows the answer's text: its citation marks, then the stop chunk with the docs."""
    content, marks = cited(answer.answer, answer.docs)
    marked = content[len(answer.answer.strip()) :]
    chunks = [chunk(base, {"content": marked})] if marked else []
    return [*chunks, {**chunk(base, {}, "stop"), **_extras(answer, marks)}]


def chat_chunks(request: ChatRequest, answer: AnswerResponse) -> list[dict[str, Any]]:
    """A whole answer as `chat.completion.chunk` objects (role, text, marks, stop + docs)."""
    base = chunk_base(request)
    text = [chunk(base, {"content": answer.answer.strip()})] if answer.answer.strip() else []
    return [first_chunk(base), *text, *last_chunks(base, answer)]


def event(payload: dict[str, Any]) -> str:
    """One server-sent event as OpenAI streams them; `DONE` ends the stream."""
    return f"data: {json.dumps(payload)}\n\n"


DONE = "data: [DONE]\n\n"


def sse(chunks: list[dict[str, Any]]) -> list[str]:
    return [event(c) for c in chunks] + [DONE]


def _extras(answer: AnswerResponse, marks: list[int]) -> dict[str, Any]:
    return {
        "docs": [d.model_dump() for d in answer.docs],
        "citations": marks,
        "mode": answer.mode,
        "index_version": answer.index_version,
        "index_coverage": answer.index_coverage,
        "timings_ms": answer.timings_ms.model_dump(),
    }
