"""Seeded random tiny encoders and generators built offline from configs, for the tests and benches."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from cluster.encoders import default_encoder_path


def save_tiny_encoder(path: str | Path, dim: int = 32, seed: int = 0, layers: int = 2) -> str:
    """Write a seeded random BERT encoder with the MiniLM tokenizer to `path` (for tests)."""
    path = Path(path)
    source = Path(default_encoder_path())
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=dim,
        num_hidden_layers=layers,
        num_attention_heads=max(1, dim // 16),
        intermediate_size=2 * dim,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    transformers.BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def tiny_tokenizer(kind: str) -> PreTrainedTokenizerBase:
    """The MiniLM WordPiece vocabulary with Llama-style ([CLS] as BOS) or BART-style
    ([CLS] … [SEP]) special tokens; works offline."""
    backend = Tokenizer.from_file(str(Path(default_encoder_path()) / "tokenizer.json"))
    backend.no_padding()
    backend.no_truncation()
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    single = "[CLS] $A" if kind == "causal" else "[CLS] $A [SEP]"
    backend.post_processor = TemplateProcessing(
        single=single, pair=f"{single} $B", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="[CLS]",
        eos_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_input_names=["input_ids", "attention_mask"],
    )


def save_tiny_generator(
    path: str | Path,
    kind: str = "causal",
    dim: int = 32,
    layers: int = 2,
    seed: int = 0,
    encoder_layers: int | None = None,
    chat_template: str | None = None,
) -> str:
    """Write a seeded random tiny Llama ("causal") or BART ("seq2seq") with a WordPiece
    tokenizer to `path`, loadable offline by `load_generator(path)`. `encoder_layers` (BART only)
    defaults to `layers`; 0 leaves each encoder output its own token's (embedding + position)."""
    if kind not in ("causal", "seq2seq"):
        raise ValueError(f"kind must be 'causal' or 'seq2seq', got {kind!r}")
    tokenizer = tiny_tokenizer(kind)
    ids = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if kind == "causal":
        config = transformers.LlamaConfig(
            hidden_size=dim,
            intermediate_size=2 * dim,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **ids,
        )
        model_cls = transformers.LlamaForCausalLM
    else:
        config = transformers.BartConfig(
            d_model=dim,
            encoder_layers=layers if encoder_layers is None else encoder_layers,
            decoder_layers=layers,
            encoder_ffn_dim=2 * dim,
            decoder_ffn_dim=2 * dim,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            max_position_embeddings=512,
            decoder_start_token_id=ids["eos_token_id"],
            forced_bos_token_id=None,
            **ids,
        )
        model_cls = transformers.BartForConditionalGeneration
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(path)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    return str(path)
