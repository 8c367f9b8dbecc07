"""Moving bytes: lazy per-shard region reads, streaming writes, the memory budget."""
