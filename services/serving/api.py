"""The HTTP API of the Serve app: request/response schemas, their limits, body parsing, citations."""
from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

# Documented limits (also shown in the OpenAPI schema at /docs).
MAX_BODY_BYTES = 64 * 1024
MAX_QUESTION_CHARS = 2000
MAX_N_DOCS = 50
MAX_NUM_BEAMS = 8
MAX_NEW_TOKENS = 256
MAX_BATCH_QUESTIONS = 32
MAX_MESSAGES = 64


class ApiError(Exception):
    """A client error: HTTP status plus a message naming the problem."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        """OpenAI-style error body, so OpenAI clients show the message."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.status}}


def _question(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("question must not be empty")
    if len(value) > MAX_QUESTION_CHARS:
        raise ValueError(f"question is {len(value)} characters; the limit is {MAX_QUESTION_CHARS}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"question is not valid Unicode (lone surrogate at {error.start})") from error
    return value


Question = Annotated[str, AfterValidator(_question),
                     Field(description=f"1 to {MAX_QUESTION_CHARS} characters")]


class DecodingOptions(BaseModel):
    """How to decode: the RAG variant, the RAG-Sequence decoding, beams and length."""

    model_config = ConfigDict(extra="forbid")
    n_docs: int = Field(5, ge=1, le=MAX_N_DOCS, description="passages retrieved (K)")
    mode: Literal["sequence", "token"] = "sequence"
    decoding: Literal["thorough", "fast"] = Field(
        "fast", description="RAG-Sequence decoding; ignored for mode=token")
    num_beams: int = Field(4, ge=1, le=MAX_NUM_BEAMS)
    max_new_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS)


class AnswerRequest(DecodingOptions):
    question: Question


class RetrieveRequest(BaseModel):
    """One `question` or a list `questions`; `k` passages each."""

    model_config = ConfigDict(extra="forbid")
    question: Question | None = None
    questions: list[Question] | None = Field(None, min_length=1, max_length=MAX_BATCH_QUESTIONS)
    k: int = Field(5, ge=1, le=MAX_N_DOCS)

    def all_questions(self) -> list[str]:
        """The questions asked; exactly one of the two fields must be set."""
        if (self.question is None) == (self.questions is None):
            raise ApiError(422, "give exactly one of 'question' or 'questions'", "question")
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


class ChatRequest(DecodingOptions):
    """OpenAI chat completion request; the last user message is the question.

    OpenAI's sampling fields (temperature, top_p, ...) are accepted and ignored: answers come
    from RAG beam search. `max_tokens` / `max_completion_tokens` set `max_new_tokens`.
    """

    model_config = ConfigDict(extra="ignore")
    model: str = "rayrag"
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)

    def question(self) -> str:
        users = [m for m in self.messages if m.role == "user"]
        if not users:
            raise ApiError(422, "messages: no message with role 'user'", "messages")
        try:
            return _question(users[-1].text())
        except ValueError as error:
            raise ApiError(422, f"messages: {error}", "messages") from error

    def options(self) -> DecodingOptions:
        limit = self.max_completion_tokens or self.max_tokens or self.max_new_tokens
        return DecodingOptions(n_docs=self.n_docs, mode=self.mode, decoding=self.decoding,
                               num_beams=self.num_beams, max_new_tokens=limit)


class Doc(BaseModel):
    id: int
    title: str
    text: str
    score: float = Field(..., description="doc score as RAG uses it: scale · q(x)·d(z)")
    prob: float = Field(..., description="p(z|x): softmax of the scores over the K docs")


class Timings(BaseModel):
    retrieve: float
    generate: float
    total: float


COVERAGE = Field(..., description="fraction of the index's shards that answered; below 1 a shard "
                                  "was down and its passages could not be retrieved")


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


def decode_body(raw: bytes) -> Any:
    """Bytes → JSON value, or an ApiError naming what is wrong with the body."""
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    if not raw.strip():
        raise ApiError(400, "body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(400, f"body is not valid UTF-8 (byte {error.start})") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ApiError(400, f"body is not valid JSON: {error.msg} at line {error.lineno} "
                            f"column {error.colno}") from error


def parse_request(raw: bytes, schema: type[BaseModel]) -> Any:
    """Bytes → a validated `schema` instance; every failure is an ApiError (4xx)."""
    value = decode_body(raw)
    if not isinstance(value, dict):
        raise ApiError(400, f"body must be a JSON object, got {type(value).__name__}")
    try:
        return schema.model_validate(value)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        message = first["msg"].removeprefix("Value error, ")
        more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
        raise ApiError(422, f"{where}: {message}{more}", where) from error


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
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
        "created": int(time.time()), "model": request.model,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": None, **_extras(answer, marks),
    }


def chat_chunks(request: ChatRequest, answer: AnswerResponse) -> list[dict[str, Any]]:
    """The same answer as `chat.completion.chunk` objects (role, words, stop + docs)."""
    content, marks = cited(answer.answer, answer.docs)
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": request.model}
    words = content.split(" ")
    deltas = [{"role": "assistant", "content": ""}]
    deltas += [{"content": w if i == 0 else " " + w} for i, w in enumerate(words)]
    chunks = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]}
              for d in deltas]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   **_extras(answer, marks)})
    return chunks


def sse(chunks: list[dict[str, Any]]) -> list[str]:
    """Server-sent events as OpenAI streams them, ending with `data: [DONE]`."""
    return [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]


def _extras(answer: AnswerResponse, marks: list[int]) -> dict[str, Any]:
    return {"docs": [d.model_dump() for d in answer.docs], "citations": marks,
            "mode": answer.mode, "index_version": answer.index_version,
            "index_coverage": answer.index_coverage,
            "timings_ms": answer.timings_ms.model_dump()}
