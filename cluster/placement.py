"""Where shard replicas go: replicas of one shard on distinct nodes, every node holding about as many."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence


def choose_node(nodes: Sequence[str], load: Counter[str], avoid: Iterable[str]) -> str | None:
    """The least loaded node not in `avoid` (the nodes already holding a replica of this shard);
    the least loaded of all when every node is avoided; None without nodes. Ties go to the first."""
    if not nodes:
        return None
    avoided = set(avoid)
    free = [node for node in nodes if node not in avoided] or list(nodes)
    return min(free, key=lambda node: load[node])  # min keeps the first of equals
