"""transformers integration: ``KVCompactCache`` and its per-layer ``KVCompactLayer``.

Modules: ``cache`` (the Cache, stats, argument checks), ``layer`` (logical/physical lengths, the
update path, crop/reorder), ``storage`` (preallocated buffers, quantized codes, shared workspace),
``edits`` (span edits and whole-state export/import), ``compat`` (every transformers-version shim).
The built-in eviction rule (StreamingLLM) is ``kvcompact.policies.streaming``.
"""

from kvcompact.cache.cache import CacheStats, KVCompactCache, default_group_size
from kvcompact.cache.layer import KVCompactLayer
from kvcompact.policies.streaming import streaming_keep_idx  # after the cache: policies import compat

__all__ = ["KVCompactCache", "KVCompactLayer", "CacheStats", "default_group_size", "streaming_keep_idx"]
