"""Every transformers-version difference the cache depends on, in one place.

Supported: transformers 4.57 ... 5.24. The interface moved at four points:

* 5.4  -- ``cache_position`` left the cache API: ``get_mask_sizes(cache_position)`` became
  ``get_mask_sizes(query_length)``, ``lazy_initialization(k)`` became ``lazy_initialization(k, v)``,
  and models stopped passing ``cache_kwargs`` to ``update``.
* 5.14 -- ``get_max_length()`` replaced ``get_max_cache_shape()``.
* 5.16/5.17 -- ``crop(n)``: a negative ``n`` removes ``n`` tokens; 4.x also accepted a positive
  ``n`` meaning "keep the first ``n``", which 5.23's own layers reject. Since 5.14 ``crop(0)`` (or
  ``crop(-0)``) removes nothing: assisted and prompt-lookup decoding call it when every candidate
  token was accepted.
* 5.24 -- ``past_key_values=`` became ``cache=`` in ``forward``, ``generate`` and the attention
  modules' keyword arguments (the old name is deprecated, removal announced for 5.40). kvcompact
  passes its cache under :data:`CACHE_ARG`, so no deprecation warning comes from its own calls.

The layer and cache classes accept every form (duck typing on the argument), so this module only
answers questions; it never patches transformers.
"""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = [
    "Cache",
    "CacheLayerMixin",
    "TRANSFORMERS_VERSION",
    "CACHE_ARG",
    "cache_kwargs",
    "cache_from_kwargs",
    "query_length",
    "crop_count",
    "layer_kinds",
    "dummy_layer",
]

TRANSFORMERS_VERSION = Version(transformers.__version__).release

# The keyword a model's forward / generate takes the cache under (see the module docstring).
CACHE_ARG = "cache" if TRANSFORMERS_VERSION >= (5, 24) else "past_key_values"


def cache_kwargs(cache) -> dict:
    """``{CACHE_ARG: cache}``: splat into ``model(...)`` or ``model.generate(...)`` on any version.

    Example
    -------
    >>> out = model(input_ids=ids, use_cache=True, **cache_kwargs(cache))
    """
    return {CACHE_ARG: cache}


def cache_from_kwargs(kwargs) -> object | None:
    """The cache an attention module was handed, under whichever name this version uses (or None)."""
    for name in ("cache", "past_key_values", "past_key_value"):
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


# Layer types whose cache is a plain growing K/V list (full) or a window of it (sliding, chunked).
_FULL = ("full_attention",)
_WINDOWED = ("sliding_attention", "chunked_attention")


def query_length(query_or_cache_position) -> int:
    """Number of new tokens from ``get_mask_sizes``'s argument.

    Parameters
    ----------
    query_or_cache_position : int or torch.Tensor
        ``query_length`` (transformers >= 5.4) or ``cache_position`` ``[Q]`` int64 (older).
    """
    if isinstance(query_or_cache_position, torch.Tensor):
        return int(query_or_cache_position.shape[0]) if query_or_cache_position.dim() else int(query_or_cache_position)
    return int(query_or_cache_position)


def crop_count(n: int, logical_len: int) -> int:
    """Tokens to remove for ``crop(n)`` under either convention.

    Negative ``n`` removes ``-n`` tokens (every version). ``0`` removes nothing: since 5.14 that is
    what ``crop(-0)`` means, and ``generate`` calls it in assisted / prompt-lookup decoding whenever
    every candidate was accepted (4.x read ``crop(0)`` as "keep 0 tokens", but no 4.x caller passes
    0, so the 5.x reading is taken on every version). A positive ``n`` is the 4.x legacy "keep the
    first ``n`` tokens"; it is honoured on every version rather than rejected, since the meaning is
    unambiguous.
    """
    if n <= 0:
        return min(-n, logical_len)
    return max(logical_len - n, 0)


def layer_kinds(config) -> list[tuple[str, int | None]]:
    """``(layer_type, window)`` per decoder layer, exactly as the installed ``DynamicCache`` sees them.

    Parameters
    ----------
    config : transformers.PretrainedConfig
        The model config (multimodal configs are reduced to their text decoder).

    Returns
    -------
    list of (str, int or None)
        ``layer_type`` is transformers' name ("full_attention", "sliding_attention", "dummy", ...);
        ``window`` is the sliding window / chunk size for windowed layers, else None.
    """
    text = config.get_text_config(decoder=True)
    try:  # transformers >= 5.x: the helper DynamicCache itself uses.
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:
        get_layer_types_and_kwargs = None
    if get_layer_types_and_kwargs is not None:
        types, kwargs = get_layer_types_and_kwargs(text)
        return [(t, kw.get("sliding_window")) for t, kw in zip(types, kwargs)]

    # transformers 4.56/4.57: the logic of DynamicCache.__init__, reproduced.
    window = getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None)
    types = getattr(text, "layer_types", None)
    if types is None:
        types = ["sliding_attention" if window is not None else "full_attention"] * text.num_hidden_layers
    if hasattr(text, "num_kv_shared_layers"):
        types = types[: -text.num_kv_shared_layers]
    return [(t, window if t in _WINDOWED else None) for t in types]


def is_full(layer_type: str) -> bool:
    return layer_type in _FULL


def is_windowed(layer_type: str) -> bool:
    return layer_type in _WINDOWED


def dummy_layer():
    """transformers' ``DummyLayer`` (a KV-sharing consumer holds no cache), or None before it existed."""
    try:
        from transformers.cache_utils import DummyLayer
    except ImportError:
        return None
    return DummyLayer()
