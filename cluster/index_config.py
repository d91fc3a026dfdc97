"""The index config: an index root and its shard group, which version is served, how one is built."""

from __future__ import annotations

from pydantic import Field

from cluster.shard_group import ShardGroupConfig


class IndexConfig(ShardGroupConfig):
    """deploy.yaml's `args.index` and the training config's `index`: the shard group's settings, the
    version it serves (pinned, or the published one followed every `follow_s` seconds; 0: off), and
    what a version is built from (the first build when the root has none, and training's refreshes)."""

    version: str | None = None
    follow_s: float = Field(2.0, ge=0)
    corpus: str = "default"  # load_corpus spec: the passages every version indexes
    corpus_limit: int | None = Field(None, ge=1)
    shards: int = Field(1, ge=1)
    # a refresh re-encodes inside the refresher actor at low priority (0: no start-up cost), or on a
    # pool of N Ray encoder actors
    refresh_encoders: int = Field(0, ge=0)
