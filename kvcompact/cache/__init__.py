"""transformers integration: ``KVCompactCache`` and its per-layer ``KVCompactLayer``.

Modules: ``cache`` (the Cache, stats, argument checks), ``layer`` (logical/physical lengths, the
update path, crop/reorder), ``storage`` (preallocated buffers, quantized codes, shared workspace),
``streaming`` (the built-in eviction rule), ``compat`` (every transformers-version shim).
"""

from kvcompact.cache.cache import CacheStats, KVCompactCache, default_group_size
from kvcompact.cache.layer import KVCompactLayer
from kvcompact.cache.streaming import streaming_keep_idx

__all__ = ["KVCompactCache", "KVCompactLayer", "CacheStats", "default_group_size", "streaming_keep_idx"]
