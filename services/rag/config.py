"""The configs every entry point shares: how an answer is decoded, and which models answer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from cluster.config import Config
from services.rag.precision import Precision

Mode = Literal["sequence", "token"]  # RAG-Sequence or RAG-Token
Decoding = Literal["thorough", "fast"]  # RAG-Sequence decoding


class DecodingConfig(Config):
    """How an answer is decoded: from how many passages, which RAG variant, beams and length."""

    model_config = ConfigDict(frozen=True)
    n_docs: int = Field(5, ge=1, description="passages retrieved (K)")
    mode: Mode = Field("sequence", description="RAG-Sequence or RAG-Token")
    decoding: Decoding = Field(
        "fast",
        description="RAG-Sequence decoding (thorough: rescore every hypothesis under all K passages); "
        "ignored for mode=token",
    )
    num_beams: int = Field(4, ge=1, description="beams (1: greedy)")
    max_new_tokens: int = Field(32, ge=1, description="the longest answer, in tokens")


class ModelsConfig(Config):
    """The models by name or path (e.g. the folders of a training export), and the generator's precision
    when it is loaded to answer (training's arithmetic is its `compute.precision`)."""

    model_config = ConfigDict(frozen=True)
    query_encoder: str = Field("default", description="query encoder: name or path")
    # None (the default) becomes the query encoder's name when the config is validated
    doc_encoder: str | None = Field(None, description="document encoder (default: the query encoder)")
    generator: str = Field("default", description="generator: name, path or .gguf file")
    precision: Precision = Field(
        "auto", description="generator weights (auto: bfloat16 where the CPU or GPU multiplies it natively)"
    )

    def names(self) -> dict[str, str]:
        """The models by name or path, without the precision they answer at: what a training run and its
        checkpoints depend on."""
        return self.model_dump(exclude={"precision"})

    @model_validator(mode="before")
    @classmethod
    def _same_encoders(cls, raw: Any) -> Any:
        """Without a document encoder, the query encoder's model encodes the documents too."""
        if isinstance(raw, dict) and raw.get("doc_encoder") is None:
            return {**raw, "doc_encoder": raw.get("query_encoder", "default")}
        return raw
