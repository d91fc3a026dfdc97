"""Learning to read the corpus: on a toy whose answers exist only in its passages, the RAG loss falls
and RAG's exact match beats a closed-book generator trained for as many steps.

Evidence is on the TRAINING questions (not held-out keys): a tiny random BART does not reliably learn
to copy an answer it has never produced within the time budget, so held-out EM is not asserted. The
closed-book baseline is the same generator trained with the same loop, data order and steps but
given one empty passage (how training/evaluate.py poses "closed_book"); it can only memorise the 64
key → answer pairs, while RAG can read the answer from the retrieved passage.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cluster.passages import Passage, load_qa, passage_text
from cluster.shard_group import SearchResult, ShardGroup, ShardGroupConfig
from training.config import TrainConfig, config_from_dict
from training.evaluate import EvalConfig, predict, retrieve
from training.loop import Search, global_batch, make_optimizer, train_step
from training.metrics import recall_at_k, score_predictions
from training.modules import RagTrainModule, build_train_module
from training.trainer import prepare_index

STEPS, BATCH, N_DOCS, LR = 500, 8, 2, 3e-3


@pytest.fixture(scope="module")
def pool_index(pool_toy, ray_session, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pool_run")
    cfg = config_from_dict(pool_toy.raw_config(
        run_dir, n_docs=N_DOCS, optimizer={"lr": LR}, scaling={"num_workers": 1},
        schedule={"steps": STEPS, "batch_size": BATCH, "checkpoint_every": STEPS}))
    prepare_index(cfg)
    group = ShardGroup(ShardGroupConfig(index_root=cfg.index.root))
    yield cfg, group
    group.close()


def closed_book_search(queries: np.ndarray, k: int) -> SearchResult:
    """One empty passage per question with a zero vector: the generator sees only the question."""
    n, d = queries.shape
    return SearchResult(scores=np.zeros((n, 1), np.float32), ids=np.full((n, 1), -1, np.int64),
                        titles=[[""] for _ in range(n)], texts=[[""] for _ in range(n)],
                        vectors=np.zeros((n, 1, d), np.float32), version="closed-book", coverage=1.0)


def train(cfg: TrainConfig, search: Search) -> tuple[RagTrainModule, list[float]]:
    """The single-process loop: frozen query encoder, generator trained with the RAG loss."""
    torch.manual_seed(cfg.schedule.seed)
    module = build_train_module(cfg.models, cfg.variant, train_doc_encoder=False).train()
    module.rag.query_encoder.requires_grad_(False)  # retrieval works by title-token overlap already
    optimizer = make_optimizer(module, cfg.optimizer.lr, cfg.optimizer.weight_decay)
    examples = load_qa(cfg.data.train)
    losses = []
    for step in range(cfg.schedule.steps):
        batch = [examples[i] for i in global_batch(len(examples), step, BATCH, cfg.schedule.seed)]
        loss, _ = train_step(module, optimizer, search, batch, cfg)
        losses.append(float(loss))
    return module.eval(), losses


def test_rag_loss_falls_and_em_beats_closed_book(pool_index):
    torch.set_num_threads(1)
    cfg, group = pool_index
    examples = load_qa(cfg.data.train)
    questions, answers = [e.question for e in examples], [list(e.answers) for e in examples]
    eval_cfg = EvalConfig(n_docs=(N_DOCS,), batch_size=32, num_beams=2, max_new_tokens=4)

    rag, rag_losses = train(cfg, lambda q, k: group.search(q, k, return_vectors=True))
    found = retrieve(rag.rag, group, questions, N_DOCS, eval_cfg.batch_size)
    passages = [[passage_text(Passage(0, t, x)) for t, x in zip(ts, xs)]
                for ts, xs in zip(found.titles, found.texts)]
    assert recall_at_k(passages, answers, 1) == 1.0  # the answer is always in the top passage
    rag_em = score_predictions(predict(rag.rag, questions, found, "rag_sequence", N_DOCS, eval_cfg), answers)["em"]

    closed, closed_losses = train(cfg, closed_book_search)
    closed_em = score_predictions(predict(closed.rag, questions, None, "closed_book", 1, eval_cfg), answers)["em"]

    figures = (f"loss {np.mean(rag_losses[:10]):.2f} -> {np.mean(rag_losses[-50:]):.2f} "
               f"(closed-book {np.mean(closed_losses[-50:]):.2f}); EM rag {rag_em:.2f} closed-book {closed_em:.2f}")
    print(figures)
    assert np.mean(rag_losses[-50:]) < 0.1 * np.mean(rag_losses[:10]), figures
    assert np.mean(rag_losses[-50:]) < 0.7 * np.mean(closed_losses[-50:]), figures
    assert rag_em >= closed_em + 0.3, figures
