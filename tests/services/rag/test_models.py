"""Generator loading: the GGUF → safetensors cache (atomic, locked, once), tiny HF models, bad input."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from services.rag.loading import COMPLETE, cached_gguf, ensure_cached, load_generator
from tests.tiny_models import save_tiny_generator

REPO = Path(__file__).resolve().parents[3]


def write_tiny_gguf(path: Path, hidden: int = 16, layers: int = 1, ffn: int = 32, seed: int = 0) -> Path:
    """A random float32 Llama GGUF with a byte-level vocabulary, in the layout llama.cpp writes."""
    rng = np.random.default_rng(seed)
    tokens = list(bytes_to_unicode().values()) + ["<|im_start|>", "<|im_end|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3, 3])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    shapes = {
        "token_embd.weight": (len(tokens), hidden),
        "output_norm.weight": (hidden,),
        "output.weight": (len(tokens), hidden),
    }
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (hidden,),
            f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden),
            f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn),
        }
        shapes |= {
            f"blk.{i}.{name}.weight": (hidden, hidden)
            for name in ("attn_q", "attn_k", "attn_v", "attn_output")
        }
    for name, shape in shapes.items():
        writer.add_tensor(name, (0.1 * rng.standard_normal(shape)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_conversion_matches_loading_the_gguf_directly(tmp_path: Path) -> None:
    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    model, tokenizer = load_generator(str(source), cache_dir=str(cache))
    entries = [p.name for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 1 and entries[0].startswith("tiny-")  # no temp folder left behind
    assert (cache / entries[0] / COMPLETE).is_file()
    assert (cache / entries[0] / "model.safetensors").is_file()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    batch = tokenizer(["hello there", "a b"], return_tensors="pt", padding=True)
    assert not model.training and tokenizer.pad_token is not None
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)
    again, _ = load_generator(str(source), cache_dir=str(cache))  # served from the cache
    assert [p.name for p in cache.iterdir() if p.is_dir()] == entries
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_ensure_cached_builds_once(tmp_path: Path) -> None:
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "weights").write_text("w")

    target = tmp_path / "entry"
    assert ensure_cached(target, build) == target
    assert ensure_cached(target, build) == target
    assert len(calls) == 1 and (target / "weights").read_text() == "w"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry", "entry.lock"]


def test_failed_build_leaves_nothing_and_a_half_written_entry_is_rebuilt(tmp_path: Path) -> None:
    target = tmp_path / "entry"

    def crash(out: Path) -> None:
        (out / "half").write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ensure_cached(target, crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.lock"]
    target.mkdir()
    (target / "half").write_text("partial")  # e.g. a copy interrupted by someone else
    ensure_cached(target, lambda out: (out / "full").write_text("ok"))
    assert sorted(p.name for p in target.iterdir()) == [COMPLETE, "full"]


CONCURRENT_BUILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from services.rag.loading import ensure_cached

    target, log = Path(sys.argv[1]), Path(sys.argv[2])

    def slow_build(out):
        with log.open("a") as handle:
            handle.write("build\\n")
        for i in range(20):
            (out / f"part-{i}").write_text(str(i))
            time.sleep(0.05)

    print(sorted(p.name for p in ensure_cached(target, slow_build).iterdir()))
    """
)


def test_two_processes_at_once_build_once(tmp_path: Path) -> None:
    target, log = tmp_path / "entry", tmp_path / "builds.log"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_BUILD, str(target), str(log)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert log.read_text() == "build\n"
    expected = str(sorted([COMPLETE] + [f"part-{i}" for i in range(20)]))
    assert [out.strip() for out in outputs] == [expected, expected]


def test_a_gguf_that_does_not_load_is_named(tmp_path: Path) -> None:
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(ValueError, match="notes.gguf"):
        load_generator(str(not_gguf), cache_dir=str(tmp_path / "cache"))
    broken = tmp_path / "broken.gguf"
    writer = gguf.GGUFWriter(str(broken), "llama")  # header only: no hyperparameters, no tensors
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="cannot load GGUF.*broken.gguf"):
        cached_gguf(broken, cache_dir=tmp_path / "cache")
    assert not any(p.is_dir() for p in (tmp_path / "cache").iterdir())
    with pytest.raises(ValueError, match="missing.gguf"):
        load_generator(str(tmp_path / "missing.gguf"))


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_tiny_generators_load_by_config(tmp_path: Path, kind: str) -> None:
    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    model, tokenizer = load_generator(save_tiny_generator(tmp_path / kind, kind=kind, chat_template=template))
    assert model.config.is_encoder_decoder == (kind == "seq2seq")
    assert not model.training and tokenizer.chat_template == template
    ids = tokenizer("hello world")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == model.config.bos_token_id
    assert (ids[-1] == tokenizer.eos_token_id) == (kind == "seq2seq")  # Llama adds BOS only, BART both
    batch = tokenizer(["a question", "another longer question here"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[0] == 2 and int(out.max()) < model.config.vocab_size


def test_unknown_generator_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'no-such-org/no-such-model'"):
        load_generator("no-such-org/no-such-model")
    with pytest.raises(ValueError, match="'seq3seq'"):
        save_tiny_generator(tmp_path, kind="seq3seq")
