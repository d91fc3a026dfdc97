"""Replica placement (pure): replicas of a shard on distinct nodes, every node about as loaded."""

from __future__ import annotations

from collections import Counter

import pytest

from cluster.placement import choose_node


def _plan(shards: int, replicas: int, nodes: list[str]) -> list[list[str | None]]:
    """Place shard by shard as ReplicaSet does: each replica on the least loaded node its shard lacks."""
    load: Counter[str] = Counter()
    rows: list[list[str | None]] = []
    for _ in range(shards):
        row: list[str | None] = []
        for _ in range(replicas):
            node = choose_node(nodes, load, [n for n in row if n is not None])
            row.append(node)
            load[node] += 1
        rows.append(row)
    return rows


@pytest.mark.parametrize(("shards", "replicas", "nodes"), [(3, 2, 3), (5, 2, 3), (4, 3, 4), (2, 2, 5)])
def test_replicas_on_distinct_nodes_and_load_balanced(shards: int, replicas: int, nodes: int) -> None:
    names = [f"n{i}" for i in range(nodes)]
    rows = _plan(shards, replicas, names)
    assert all(len(set(row)) == replicas for row in rows)
    counts = Counter(node for row in rows for node in row)
    assert max(counts.values()) - min(counts.get(n, 0) for n in names) <= 1


def test_more_replicas_than_nodes_still_balanced() -> None:
    rows = _plan(2, 3, ["a", "b"])
    assert all(set(row) == {"a", "b"} for row in rows)
    counts = Counter(node for row in rows for node in row)
    assert counts == Counter({"a": 3, "b": 3})


def test_restart_avoids_the_node_of_the_live_sibling() -> None:
    # a restarted replica of a shard that lives on a: b and c are equally loaded, the first wins
    load = Counter({"a": 2, "b": 1, "c": 1})
    assert choose_node(["a", "b", "c"], load, avoid=["a"]) == "b"
    assert choose_node(["a", "b"], Counter({"a": 1, "b": 5}), avoid=["a", "b"]) == "a"
    assert choose_node([], Counter(), avoid=[]) is None
