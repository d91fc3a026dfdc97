"""What training optimises: the RAG model (+ document encoder when trained) behind one loss `forward`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cluster.encoders import TextEncoder
from cluster.passages import Passage, passage_text
from services.rag.checkpoint import TrainState, read_state
from services.rag.config import Mode
from services.rag.generator import make_generator
from services.rag.loading import load_generator
from services.rag.model import RagModel
from training.checkpoint import load_checkpoint
from training.config import ComputeConfig, ModelsConfig


class RagTrainModule(torch.nn.Module):
    """DDP wraps this: `forward` is the RAG marginal NLL, so gradient sync follows the loss.

    With a document encoder, the retrieved passages are re-encoded here with gradient (the
    index vectors are stale by design); without one the index's document vectors are used.
    """

    def __init__(self, rag: RagModel, doc_encoder: TextEncoder | None, mode: Mode) -> None:
        super().__init__()
        self.rag, self.doc_encoder, self.mode = rag, doc_encoder, mode

    def modules_to_save(self) -> dict[str, torch.nn.Module]:
        parts: dict[str, torch.nn.Module] = {"rag": self.rag}
        if self.doc_encoder is not None:
            parts["doc_encoder"] = self.doc_encoder
        return parts

    def forward(
        self,
        questions: list[str],
        answers: list[str],
        titles: list[list[str]],
        texts: list[list[str]],
        doc_vectors: np.ndarray,
        doc_scores: np.ndarray | None = None,
    ) -> torch.Tensor:
        """The loss; `doc_scores` (B, K) fixes p(z|x)'s logits (BM25), else the dense ones get gradient."""
        if doc_scores is not None:
            fixed = torch.as_tensor(doc_scores)  # (B, K)
            return self.rag.loss(questions, answers, titles, texts, doc_vectors, self.mode, doc_scores=fixed)
        vectors = torch.tensor(doc_vectors)  # (B, K, d) a copy: search results are read-only
        if self.doc_encoder is not None:
            flat = [passage_text(Passage(0, t, x)) for ts, xs in zip(titles, texts) for t, x in zip(ts, xs)]
            device = next(self.doc_encoder.parameters()).device
            batch = {k: v.to(device) for k, v in self.doc_encoder.tokenize(flat).items()}
            encoded = self.doc_encoder(**batch)  # (B*K, d)
            vectors = encoded.view(len(questions), len(titles[0]), -1)  # (B, K, d)
        return self.rag.loss(questions, answers, titles, texts, vectors, mode=self.mode)


def build_train_module(models: ModelsConfig, mode: Mode, train_doc_encoder: bool) -> RagTrainModule:
    """Load the query encoder, generator (and document encoder when trained) named in the config, for
    training: float32 weights (mixed precision is the step's autocast; inference loads through
    `services.rag.loading.load_rag`)."""
    query_encoder = TextEncoder.from_pretrained(models.query_encoder)
    model, tokenizer = load_generator(models.generator)
    rag = RagModel(query_encoder, make_generator(model, tokenizer))
    doc_encoder = TextEncoder.from_pretrained(models.doc_encoder) if train_doc_encoder else None
    return RagTrainModule(rag, doc_encoder, mode)


def train_top_layers(model: torch.nn.Module, layers: int) -> None:
    """Freeze the generator but its top `layers` decoder blocks and the final norm: the backward
    stops at the lowest trained block, and frozen blocks keep no activations or optimizer state."""
    model.requires_grad_(False)
    decoder = model.get_decoder()
    blocks = decoder.layers
    if layers > len(blocks):
        raise ValueError(f"train_generator_layers={layers} exceeds the generator's {len(blocks)} blocks")
    for block in blocks[len(blocks) - layers :]:
        block.requires_grad_(True)
    for name in ("norm", "final_layer_norm", "layer_norm"):
        if layers and isinstance(getattr(decoder, name, None), torch.nn.Module):
            getattr(decoder, name).requires_grad_(True)
    if layers and not model.config.tie_word_embeddings:
        model.get_output_embeddings().requires_grad_(True)


def apply_compute(module: RagTrainModule, compute: ComputeConfig) -> None:
    """Freezing and gradient checkpointing as the config's `compute` section asks."""
    model = module.rag.generator.model
    if compute.train_generator_layers is not None:
        train_top_layers(model, compute.train_generator_layers)
    if compute.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_trained(checkpoint_dir: str | Path) -> tuple[RagTrainModule, TrainState]:
    """The trained modules of a training checkpoint as training holds them (float32), for export."""
    state = read_state(checkpoint_dir)
    module = build_train_module(ModelsConfig(**state.models), "sequence", state.doc_encoder_trained)
    load_checkpoint(checkpoint_dir, module.modules_to_save())
    return module.eval(), state


def export_models(checkpoint_dir: str | Path, out_dir: str | Path) -> dict[str, str]:
    """Write a checkpoint's trained models as plain Hugging Face folders that serving loads by path:
    `query_encoder/`, `generator/` and, when it was trained, `doc_encoder/`."""
    module, _ = load_trained(checkpoint_dir)
    out = Path(out_dir)
    generator = module.rag.generator
    generator.model.save_pretrained(out / "generator")
    generator.tokenizer.save_pretrained(out / "generator")
    folders = {
        "query_encoder": module.rag.query_encoder.save_pretrained(out / "query_encoder"),
        "generator": str(out / "generator"),
    }
    if module.doc_encoder is not None:
        folders["doc_encoder"] = module.doc_encoder.save_pretrained(out / "doc_encoder")
    return folders
