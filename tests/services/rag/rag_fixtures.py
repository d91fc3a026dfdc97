"""Tiny seeded models shared by the RAG tests: BART inside transformers RAG, Llama + chat tokenizer."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
)

BART_PAD, BART_EOS, BART_BOS = 1, 2, 0
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + ' ' + m['content'] + ' <|im_end|> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}"
)
WORDS = (
    "the a of in is was by who what when film directed produced space odyssey stanley kubrick 1968 "
    "paris france capital city river seine question passage answer system user assistant . , ? : "
    "short phrase using with"
).split()


def tiny_bart(seed: int = 0, vocab: int = 48) -> BartForConditionalGeneration:
    """A 2+2-layer BART with peaked random weights (init_std 0.3) so beams differ across documents."""
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=vocab,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        init_std=0.3,
        dropout=0.0,
        pad_token_id=BART_PAD,
        eos_token_id=BART_EOS,
        bos_token_id=BART_BOS,
        decoder_start_token_id=BART_EOS,
        forced_eos_token_id=BART_EOS,
    )
    return BartForConditionalGeneration(config).eval()


def hf_rag(
    bart: BartForConditionalGeneration, n_docs: int, label_smoothing: float = 0.0
) -> tuple[RagSequenceForGeneration, RagTokenForGeneration]:
    """transformers' RAG-Sequence and RAG-Token around `bart` (a tiny BERT question encoder, unused)."""
    q_config = BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    config = RagConfig.from_question_encoder_generator_configs(
        q_config, bart.config, n_docs=n_docs, label_smoothing=label_smoothing
    )
    question_encoder = BertModel(q_config)
    seq = RagSequenceForGeneration(config=config, question_encoder=question_encoder, generator=bart).eval()
    tok = RagTokenForGeneration(config=config, question_encoder=question_encoder, generator=bart).eval()
    return seq, tok


def random_contexts(
    batch: int, n_docs: int, vocab: int, seed: int = 1, padded: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B*K, L) context ids (no special ids inside) and their mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch * n_docs, 12), generator=g)  # (B*K, L)
    lengths = torch.randint(6 if padded else 12, 13, (batch * n_docs,), generator=g)  # (B*K,)
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()  # (B*K, L)
    return ids.masked_fill(mask == 0, BART_PAD), mask


def random_labels(batch: int, vocab: int, seed: int = 2) -> torch.Tensor:
    """transformers-style labels (B, T): decoder start, bos, 2..5 tokens, eos, pads."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        body = torch.randint(3, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        rows.append([BART_EOS, BART_BOS, *body, BART_EOS])
    width = max(len(r) for r in rows)
    return torch.tensor([r + [BART_PAD] * (width - len(r)) for r in rows])


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a chat template (eos <|im_end|>, pad = eos, as SmolLM2)."""
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + list(WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with peaked random weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()
