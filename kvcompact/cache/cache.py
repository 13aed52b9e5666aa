"""``KVCompactCache``: a transformers ``Cache`` with 8-bit storage, token budgets and honest stats.

Example
-------
>>> from kvcompact.cache import KVCompactCache
>>> cache = KVCompactCache(model.config, kv_dtype="fp8_e4m3")
>>> out = model.generate(**inputs, cache=cache, max_new_tokens=32)  # past_key_values= before transformers 5.24
>>> s = cache.stats(); s.device_bytes / s.dense_bytes   # 0.5625 for a bf16 model (codes + fp32 scale per 32)

Idle offload (an agent waiting on a tool; a runnable version is in :mod:`kvcompact.cache.parking`)
---------------------------------------------------------------------------------------------------
>>> cache = KVCompactCache(model.config, kv_dtype="int8", offload="idle")
>>> out = model.generate(**inputs, cache=cache, max_new_tokens=32)
>>> nbytes = cache.park()           # every buffer to pinned host memory; device_bytes -> 0
>>> cache.stats().device_bytes, cache.stats().host_bytes > 0
(0, True)
>>> out = model.generate(out, cache=cache, max_new_tokens=32)   # resumes itself first

Layer offload (KV in pinned host memory, two layers on the device; see :mod:`kvcompact.cache.offload_layers`)
------------------------------------------------------------------------------------------------------------
>>> cache = KVCompactCache(model.config, kv_dtype="int8", offload="layers")
>>> out = model.generate(**inputs, cache=cache, max_new_tokens=32)   # same tokens as without offload
>>> s = cache.stats()      # device_bytes: the two staging slots, whatever the context length
>>> s.host_bytes == cache.pool.capacity_bytes        # every layer's storage, in the cache's own pool
True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvcompact.cache import compat
from kvcompact.cache.edits import SpanEditsMixin
from kvcompact.cache.layer import KVCompactLayer
from kvcompact.cache.parking import ParkingMixin
from kvcompact.cache.storage import Workspace
from kvcompact.formats import FORMATS

# Attention sinks the built-in streaming rule always keeps; a budget must exceed them.
SINKS = 4
# Longest chunk whose attention kvcompact computes from storage inside attach (decode steps,
# assisted-decoding candidates, short turns); longer chunks use the model's own attention.
MAX_DEFERRED_QUERIES = 32

__all__ = ["KVCompactCache", "CacheStats", "default_group_size"]

# Default scale group along head_dim, per format, chosen from SmolLM2-135M measurements
# (teacher-forced perplexity ratio to dense, 256 tokens after a 1,024-token context; see
# benchmarks/RESULTS.md):
#   one scale per token-head: fp8_e4m3 x1.0083, fp8_e5m2 x1.0044, int8 x1.0008
#   groups of 32:             fp8_e4m3 x1.0005,                   int8 x1.0012
# SmolLM2's keys have outlier channels; with one scale per head, e4m3 (max 448, 3 mantissa bits)
# loses the small channels, and groups of 32 recover them for 4 scale bytes per 32 codes (+12.5%).
# int8's uniform grid already does as well per head, so it keeps the cheaper whole-head scale.
_DEFAULT_GROUP = {"fp8_e4m3": 32, "fp8_e5m2": 32, "int8": None}


def default_group_size(kv_dtype: str, head_dim: int) -> int | None:
    """Group size used when ``group_size=None``: see ``_DEFAULT_GROUP``; whole head if 32 does not divide D."""
    g = _DEFAULT_GROUP[kv_dtype]
    return g if g is not None and head_dim % g == 0 and head_dim > g else None


@dataclass
class CacheStats:
    """Sizes of a ``KVCompactCache`` at one moment.

    Attributes
    ----------
    logical_tokens : int
        Tokens the cache has seen (the model's position counter).
    physical_tokens : list of int
        Tokens held per layer (0 for layers holding no cache).
    device_bytes : int
        Device memory of the stored tokens: every buffer at its capacity (codes, scales, residual
        window). The dequantization workspace is scratch, reported apart in ``workspace_bytes``;
        peak device memory of the cache is ``device_bytes + workspace_bytes``. 0 while parked.
    host_bytes : int
        Pinned host memory held for the cache, in every state. A cache built without ``pool=``
        owns the pool it allocated at its first park and keeps it for the next one: its whole
        ``capacity_bytes`` (0 before the first park; the same while parked and after resume). A
        cache parking into a shared ``pool=``: the pool bytes its parked buffers occupy (each
        buffer rounded up to the pool's 256-byte granule, as ``PinnedPool.used_bytes`` counts),
        while parked or while the resume copy is in flight, else 0 -- so the ``host_bytes`` of
        the caches sharing a pool add up to its ``used_bytes``.
    dense_bytes : int
        What the held (physical) tokens would take as K and V in the model dtype.
    workspace_bytes : int
        The shared dequantization workspace: at most one layer's K and V in the model dtype
        (0 for lossless storage).
    """

    logical_tokens: int
    physical_tokens: list[int] = field(default_factory=list)
    device_bytes: int = 0
    host_bytes: int = 0
    dense_bytes: int = 0
    workspace_bytes: int = 0


class KVCompactCache(ParkingMixin, SpanEditsMixin, compat.Cache):
    """A ``transformers.Cache`` over preallocated, optionally 8-bit buffers with token budgets.

    Example
    -------
    >>> cache = KVCompactCache(model.config, kv_dtype="int8", budget=1024)
    >>> out = model.generate(**inputs, cache=cache, max_new_tokens=64)  # past_key_values= before 5.24
    >>> cache.stats().physical_tokens[0] <= 1024 + cache.slack
    True

    Parameters
    ----------
    config : transformers.PretrainedConfig
        The model config; layer types (full / sliding / chunked) and head_dim come from it.
    kv_dtype : {None, "fp8_e4m3", "fp8_e5m2", "int8"}
        Storage format. None stores the model dtype and is exact (same outputs as ``DynamicCache``).
    group_size : int, optional
        Elements of head_dim per fp32 scale. Default: 32 for fp8, whole head for int8 (see
        ``_DEFAULT_GROUP`` for the measurements behind it).
    budget : int, optional
        Max physical tokens per full-attention layer after an eviction; layers may exceed it by
        ``slack = max(1, budget // 8)`` between evictions. None = keep everything.
    policy : None, str, or object
        Eviction rule when ``budget`` is set. None keeps 4 sink tokens and the newest
        ``budget - 4`` (StreamingLLM, built in). A name is resolved by
        ``kvcompact.policies.get_policy``. An object
        must provide ``keep_indices(layer, budget, *, keys, values, layer_idx, observed) ->
        keep_idx [B, H, K]`` (``kvcompact.policies.Policy``); its ``validate(budget, num_layers)``
        is called here, so a bad budget fails at construction. Per-layer budgets (a policy whose
        ``layer_budget`` differs by layer, e.g. a pyramid schedule) are refused: see Notes.
    offload : {None, "idle", "layers"}
        What using a parked cache does (every cache can :meth:`park` / :meth:`resume`; see
        :mod:`kvcompact.cache.parking`). ``"idle"``: the cache lives on the device while used and
        goes to pinned host memory while idle; ``update`` (a forward, ``generate``), ``crop``,
        span edits and exports on a parked cache resume it first, so a model may run on it as
        if it had never left (same tokens). None: the cache moves only when told, and those
        operations on a parked cache raise ``RuntimeError`` until :meth:`resume`. ``"layers"``:
        every layer's storage lives in pinned host memory (one pool) and is streamed through two
        device slots during the forward, the next layer prefetched on a side stream while the
        current one computes; see :mod:`kvcompact.cache.offload_layers`.
    pool : kvcompact.offload.PinnedPool, optional
        Pinned host memory to park into, shared with other caches or sessions. Default: the
        cache allocates one sized for its buffers at its first park and reuses it (growing it
        geometrically if the buffers outgrew it). A shared pool too small for the cache makes
        :meth:`park` raise ``PoolExhaustedError`` and leaves the cache on the device, unchanged.
        With ``offload="layers"`` the pool holds the storage itself (default: the cache's own,
        sized at the first update and doubled when full); a shared pool too small raises
        ``PoolExhaustedError`` at the first layer of the forward, before any layer changed (a
        cache that was empty stays empty), and the cache stays usable once there is room.
        ``park()`` then frees only the device slots (nothing moves) and returns 0.
    residual : int
        Newest tokens per layer also kept in full precision (quantized formats only).

    Notes
    -----
    * Lengths: ``get_seq_length()`` is the LOGICAL length (tokens seen); each layer's ``update``
      returns its PHYSICAL tokens and ``get_mask_sizes`` says so, as in transformers'
      ``DynamicSlidingWindowLayer``. ``generate``, hand-written loops and multi-turn reuse keep
      positions right after eviction.
    * Every full-attention layer holds the same number of physical tokens. transformers builds ONE
      attention mask for all full-attention layers from the first one's ``get_mask_sizes``; a
      layer holding a different count would be handed a mask of the wrong width (eager attention
      fails, a multi-token chunk would be masked at the wrong columns). Hence one budget for all
      full layers, and ``get_mask_sizes`` raises if a manual ``layer.compact`` left them unequal.
    * Left padding + eviction is refused: the 2-D padding mask is indexed as if kept tokens were
      contiguous, so a padded row would see pads as real tokens (and real tokens masked). Batch 1,
      or a batch declared unpadded with :meth:`note_attention_mask`, may evict; a batch > 1 that
      was not declared raises ``ValueError`` at the first eviction. Without eviction, padding works
      exactly as with ``DynamicCache``.
    * Eviction runs in :meth:`update`, right after the layer appended (the layers hold no
      reference to the cache, so ``del cache`` frees its memory at once).
    * Span edits (:meth:`drop_span`, :meth:`splice`, :meth:`shift_keys`) and whole-state
      export/import (:meth:`export_state`, :meth:`storage_tensors`) are methods of the cache; see
      :class:`~kvcompact.cache.edits.SpanEditsMixin`.
    * Parking (:meth:`park`, :meth:`resume`, :attr:`parked`): every buffer of every layer --
      codes and scales or model-dtype K/V, residual shadows, full and sliding layers -- goes to
      pinned host memory, the device buffers and the workspace are freed; lengths stay, so
      ``get_seq_length`` and :meth:`stats` answer while parked. ``park()`` of a parked cache and
      ``resume()`` of one that is not parked raise ``ValueError``; :meth:`reset` of a parked
      cache discards the host copy. See :class:`~kvcompact.cache.parking.ParkingMixin`.
    * Returned K/V: lossless layers return views of their buffers (valid until that layer's next
      update); quantized layers return the shared workspace (valid until the next quantized update
      of any layer) -- attention consumes them before the next layer runs.
    * Attention from storage: inside ``kvcompact.attach(model, cache)`` (on by default for 8-bit
      storage) a chunk of at most ``MAX_DEFERRED_QUERIES`` tokens that evicts nothing returns its
      own K/V, and the model's attention, routed to :mod:`kvcompact.cache.attention`, computes
      ``kvcompact.ops.decode_attention`` over the stored rows (codes read in place): no workspace.
    * Shared prefixes: :meth:`shared_copy` makes a cache that reads this one's full-attention rows
      in place (copy on write); ``kvcompact.agent.PrefixCache`` gives every session one.
    """

    def __init__(
        self,
        config,
        *,
        kv_dtype: str | None = None,
        group_size: int | None = None,
        budget: int | None = None,
        policy=None,
        offload=None,
        residual: int = 0,
        pool=None,
    ):
        text = config.get_text_config(decoder=True)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        group_size = self._check_args(kv_dtype, group_size, budget, policy, offload, residual, head_dim)
        self._check_pool(pool)
        kinds = compat.layer_kinds(config)
        policy = self._resolve_policy(policy, budget, len(kinds))
        self.kv_dtype, self.group_size, self.residual = kv_dtype, group_size, residual
        self.budget, self.policy, self.offload_mode = budget, policy, offload
        self.slack = max(1, budget // 8) if budget is not None else 0
        self._evictor = policy if policy is not None else self._streaming_rule(budget)
        # kvcompact's own policies build valid keep_idx; a user's object gets the kernel's check.
        self._trust_keep_idx = self._is_builtin_policy(self._evictor)
        self.workspace = Workspace()
        self.observed: dict = {}  # layer_idx -> captured queries; filled by kvcompact.attach
        self._padded: bool | None = None  # None: not declared; see note_attention_mask
        self._attention_route = False  # set by kvcompact.attach: decode steps read storage directly
        self._rewrite = None  # (rows, observe) while SpanEditsMixin.rewriting is active
        self._init_parking(pool)
        # offload="layers": every attention layer's storage on the host, streamed per forward.
        self._streamer = None
        host_allocator = None
        if offload == "layers":
            from kvcompact.cache.offload_layers import LayerStreamer

            attention = sum(compat.is_full(t) or compat.is_windowed(t) for t, _ in kinds)
            self._streamer = LayerStreamer(pool, attention)
            host_allocator = self._streamer.allocator

        layers = []
        for i, (layer_type, window) in enumerate(kinds):
            if compat.is_full(layer_type) or compat.is_windowed(layer_type):
                layer_budget = budget
                if budget is not None and hasattr(policy, "layer_budget"):
                    layer_budget = policy.layer_budget(i, len(kinds), budget)
                    if layer_budget != budget and compat.is_full(layer_type):
                        raise ValueError(
                            f"policy: per-layer budgets are not supported (layer {i} would get {layer_budget}, "
                            f"not {budget}): transformers builds one attention mask for all full-attention layers, "
                            "so they must hold the same number of tokens; use a uniform schedule"
                        )
                layers.append(
                    KVCompactLayer(
                        fmt=kv_dtype,
                        group_size=group_size,
                        residual=residual,
                        workspace=self.workspace,
                        window=window if compat.is_windowed(layer_type) else None,
                        budget=layer_budget,
                        slack=max(1, layer_budget // 8) if layer_budget is not None else 0,
                        layer_idx=i,
                        host_allocator=host_allocator,
                    )
                )
            elif layer_type == "dummy" and compat.dummy_layer() is not None:
                layers.append(compat.dummy_layer())
            else:
                raise ValueError(f"KVCompactCache: layer type {layer_type!r} is not supported (attention layers only)")
        super().__init__(layers=layers)
        # The streamed layers in order, for the next-layer prefetch (after the last: the first).
        self._streamed = [(i, l) for i, l in enumerate(self.layers) if isinstance(l, KVCompactLayer)]
        self._forward_from_empty = False

    @staticmethod
    def _check_args(kv_dtype, group_size, budget, policy, offload, residual, head_dim):
        if kv_dtype is not None and kv_dtype not in FORMATS:
            raise ValueError(f"kv_dtype must be None or one of {sorted(FORMATS)}, got {kv_dtype!r}")
        if group_size is not None:
            if kv_dtype is None:
                raise ValueError("group_size applies to quantized storage only; set kv_dtype or leave group_size=None")
            if not isinstance(group_size, int) or group_size <= 0 or head_dim % group_size:
                raise ValueError(f"group_size must be a positive divisor of head_dim={head_dim}, got {group_size!r}")
        elif kv_dtype is not None:
            group_size = default_group_size(kv_dtype, head_dim)
        if not isinstance(residual, int) or residual < 0:
            raise ValueError(f"residual must be an int >= 0, got {residual!r}")
        if residual and kv_dtype is None:
            raise ValueError("residual applies to quantized storage only; set kv_dtype or leave residual=0")
        if budget is not None and (not isinstance(budget, int) or budget <= SINKS):
            raise ValueError(f"budget must be an int > {SINKS} (the sink tokens always kept), got {budget!r}")
        if policy is not None and not isinstance(policy, str) and not hasattr(policy, "keep_indices"):
            raise ValueError(f"policy must be None, a name, or an object with keep_indices(...); got {policy!r}")
        if policy is not None and budget is None:
            raise ValueError("policy needs a budget: pass budget=<max tokens per layer>")
        if offload not in (None, "idle", "layers"):
            raise ValueError(f"offload must be None, 'idle' or 'layers', got {offload!r}")
        return group_size

    @staticmethod
    def _check_pool(pool):
        from kvcompact.offload import PinnedPool

        if pool is not None and not isinstance(pool, PinnedPool):
            raise ValueError(f"pool must be None or a kvcompact.offload.PinnedPool, got {type(pool).__name__}")

    # -- eviction --------------------------------------------------------------------------------

    @staticmethod
    def _resolve_policy(policy, budget, num_layers):
        """A name becomes a policy object; validate budgets."""
        if isinstance(policy, str):
            from kvcompact.policies import get_policy

            policy = get_policy(policy)
        if policy is not None and budget is not None and hasattr(policy, "validate"):
            policy.validate(budget, num_layers)
        return policy

    @staticmethod
    def _streaming_rule(budget):
        """The rule used when a budget comes without a policy: StreamingLLM with ``SINKS`` sinks."""
        if budget is None:
            return None
        from kvcompact.policies.streaming import StreamingPolicy

        return StreamingPolicy(sinks=SINKS)

    @staticmethod
    def _is_builtin_policy(policy) -> bool:
        if policy is None:
            return True
        from kvcompact.policies.base import Policy
        from kvcompact.policies.press import KVPressPolicy

        return isinstance(policy, Policy) and not isinstance(policy, KVPressPolicy)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append to layer ``layer_idx`` and return the K/V its attention reads; evict past the budget.

        Eviction is driven from here (as transformers drives offloading from ``Cache.update``): the
        layer appends, then, once past ``budget + slack`` (or after a multi-token chunk past
        ``budget``), the policy picks ``keep_idx`` from the K/V attention is about to read and the
        layer compacts in place. The returned K/V still hold this step's pre-eviction tokens, so
        attention sees exactly what ``get_mask_sizes`` announced. With ``offload="layers"`` the same
        runs on the layer's device copy, staged from the host around it (see
        :mod:`kvcompact.cache.offload_layers`).
        """
        self._resident("update")
        if self._rewrite is not None:
            return self._rewrite_layer(layer_idx, key_states, value_states)
        layer = self.layers[layer_idx]
        if self._streamer is None or not isinstance(layer, KVCompactLayer):
            return self._update_layer(layer, key_states, value_states, args, kwargs)[:2]
        if layer_idx == self._streamed[0][0]:
            self._forward_from_empty = self.get_seq_length() == 0
        from kvcompact.offload import PoolExhaustedError

        try:
            return self._streamer.update(
                self._streamed, layer_idx, key_states, value_states,
                lambda: self._update_layer(layer, key_states, value_states, args, kwargs, shrink=False))
        except PoolExhaustedError:
            # The host pool (a shared one) cannot take the new tokens. Every used layer was given
            # room at the forward's first layer, so this is that layer (nothing written yet) or a
            # layer first used in this forward; a cache that was empty goes back to empty.
            if self._forward_from_empty:
                self.reset()
            raise

    def _update_layer(self, layer, key_states, value_states, args, kwargs, shrink: bool = True):
        """The update of one layer (and its eviction); returns ``(keys, values, evicted)``."""
        if self._defers_attention(layer, key_states):
            keys, values = layer.update_deferred(key_states, value_states)
            return keys, values, False
        keys, values = layer.update(key_states, value_states, *args, **kwargs)
        if isinstance(layer, KVCompactLayer) and layer.wants_eviction(key_states.shape[2]):
            self._check_evictable(layer)
            if layer.storage.fmt is None:
                # Lossless views alias the buffers that compaction rewrites; this step's attention
                # still needs the pre-eviction tokens. One copy per eviction, i.e. per `slack` steps.
                keys, values = keys.clone(), values.clone()
            keep_idx = self._select(layer, layer.budget, keys, values)
            layer.evict(keep_idx, validate=not self._trust_keep_idx, shrink=shrink)
            return keys, values, True
        return keys, values, False

    def _defers_attention(self, layer, key_states: torch.Tensor) -> bool:
        """Whether this step's attention is read from storage by ``decode_attention`` (see
        :mod:`kvcompact.cache.attention`): inside ``attach(model, cache)`` with the op routed, for
        chunks of at most ``MAX_DEFERRED_QUERIES`` tokens that evict nothing (an eviction scores the
        dequantized K/V), on an unpadded batch (the op applies causality, not a padding mask), and
        not with ``offload="layers"`` (its staging slots are reused per layer)."""
        if not self._attention_route or self._streamer is not None or not isinstance(layer, KVCompactLayer):
            return False
        b, _, q, _ = key_states.shape
        if q > MAX_DEFERRED_QUERIES or (b > 1 and self._padded is not False):
            return False
        return not layer.evicts_after(q)

    def _select(self, layer: KVCompactLayer, budget: int, keys=None, values=None) -> torch.Tensor:
        """The eviction rule's ``keep_idx`` ``[B, H, K]`` for ``layer``.

        ``keys``/``values`` ``[B, H, T, D]`` are what attention reads this step (for 8-bit storage,
        the dequantized workspace), so a scoring policy does not dequantize a second time.
        """
        return self._evictor.keep_indices(
            layer, budget, keys=keys, values=values, layer_idx=layer.layer_idx,
            observed=self.observed.get(layer.layer_idx),
        )

    def note_attention_mask(self, attention_mask: torch.Tensor | None) -> None:
        """Declare the 2-D padding mask ``[B, T]`` of the batch in this cache (None = unpadded).

        Needed before a batch > 1 may evict: eviction is refused if any row is padded.
        """
        self._padded = bool(attention_mask is not None and not bool(attention_mask.bool().all()))

    def _check_evictable(self, layer: KVCompactLayer) -> None:
        if self._padded:
            raise ValueError(
                "KVCompactCache: eviction with a padded batch is not supported (the 2-D padding mask would be "
                "misaligned with the kept tokens); use batch 1 or an unpadded batch, or no budget"
            )
        if self._padded is None and layer.storage.batch > 1:
            raise ValueError(
                f"KVCompactCache: evicting a batch of {layer.storage.batch} needs an unpadded batch; call "
                "cache.note_attention_mask(attention_mask) first (eviction with left padding is not supported)"
            )

    def get_mask_sizes(self, query_length, layer_idx: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of ``layer_idx`` (query length or, before 5.4, cache_position).

        transformers calls this once per layer TYPE and reuses the mask for every layer of that
        type, so all full-attention layers must agree; a clear error beats a shape error deep in
        attention (or, worse, a silently misplaced causal mask).
        """
        if layer_idx >= len(self.layers):
            return compat.query_length(query_length), 0
        full = {l.physical_len for l in self.layers if isinstance(l, KVCompactLayer) and not l.is_sliding}
        if len(full) > 1:
            raise RuntimeError(
                f"KVCompactCache: full-attention layers hold different token counts {sorted(full)}; transformers "
                "uses one mask for all of them, so compact every full-attention layer to the same K"
            )
        return self.layers[layer_idx].get_mask_sizes(query_length)

    # -- API beyond transformers' ----------------------------------------------------------------

    def stats(self) -> CacheStats:
        """Token counts and byte sizes right now (see :class:`CacheStats`)."""
        attention = [layer for layer in self.layers if isinstance(layer, KVCompactLayer)]
        ws = self.workspace.nbytes
        if self._streamer is not None:
            # The storage is on the host; the device holds the two staging slots (0 once parked).
            device_bytes = self._streamer.device_bytes
        else:
            device_bytes = sum(layer.storage.nbytes for layer in attention)
        return CacheStats(
            logical_tokens=self.get_seq_length(),
            physical_tokens=[layer.physical_len if isinstance(layer, KVCompactLayer) else 0 for layer in self.layers],
            device_bytes=device_bytes,
            host_bytes=self._host_bytes(),
            dense_bytes=sum(layer.storage.dense_bytes(layer.physical_len) for layer in attention),
            workspace_bytes=ws,
        )

    def offload_stats(self) -> dict | None:
        """``offload="layers"`` counters, None otherwise.

        Keys: ``bytes_to_device`` / ``bytes_to_host`` and ``transfers_to_device`` /
        ``transfers_to_host`` (staging copies and write-backs), ``prefetch_hits`` (updates whose
        layer was already staged) and ``staged_on_demand`` (copied at the update: a layer that
        reorganised on the host, the first of a forward after an edit), ``compute_waits`` /
        ``compute_wait_ms`` (how long the compute stream waited for a staged layer, CUDA),
        ``copy_time_ms`` (host time of the copies, CPU), ``host_syncs`` (host waits for the copy
        stream: host-side growth, trims, edits), ``pool_growths``, ``device_slot_bytes``,
        ``pool_capacity_bytes``.
        """
        return self._streamer.stats_dict() if self._streamer is not None else None

    def _host_stores(self) -> list:
        return [self._streamer.host_store(l) for _, l in self._streamed]

    def _settle_offload(self) -> None:
        """Before an operation on the storage outside a forward: the host copies become the truth."""
        if self._streamer is not None:
            self._streamer.settle()

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Logical tokens seen (of the first attention layer by default)."""
        layer_idx = 0 if layer_idx is None else layer_idx
        if layer_idx >= len(self.layers):
            return 0
        if not isinstance(self.layers[layer_idx], KVCompactLayer):
            layer_idx = next((i for i, l in enumerate(self.layers) if isinstance(l, KVCompactLayer)), None)
            if layer_idx is None:
                return 0
        return self.layers[layer_idx].get_seq_length()

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """-1: full-attention layers grow without limit (transformers >= 5.14 name)."""
        if layer_idx is None:
            return max((l.get_max_length() for l in self.layers), default=-1)
        return self.layers[layer_idx].get_max_length() if layer_idx < len(self.layers) else -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        """transformers < 5.14 name of ``get_max_length`` (per layer)."""
        return self.get_max_length(layer_idx)

    def crop(self, max_length: int) -> None:
        """Remove the newest tokens (``-n``; ``0`` removes nothing) or keep the first ``n`` (``n > 0``,
        4.x form), all layers.

        Checks every layer first -- full and sliding-window alike -- so a refused crop (tokens
        already evicted, or fallen out of a window) changes nothing.
        """
        m = compat.crop_count(max_length, self.get_seq_length())
        if m == 0:
            return
        self._resident("crop")
        for layer in self.layers:
            if isinstance(layer, KVCompactLayer):
                layer.check_crop(m)
        for layer in self.layers:
            layer.crop(-m)

    def reset(self) -> None:
        """Return to the constructed state: no tokens, no captured queries, no per-run policy state,
        no padding declaration (see :meth:`note_attention_mask`). With ``offload="layers"`` the
        device slots are freed too; an owned pool is kept for the next tokens."""
        if self._streamer is not None:
            self._streamer.release_slots()
        super().reset()
        self.observed.clear()
        self._padded = None
        if hasattr(self._evictor, "reset"):
            self._evictor.reset()

    def shared_copy(self) -> "KVCompactCache":
        """A new cache holding this cache's tokens, its full-attention storage shared, not copied.

        Made for a prompt prefix many sessions start from (:class:`kvcompact.agent.PrefixCache`):
        the copy reads the shared rows in place and writes new tokens to its own buffers, so N
        copies hold the prefix once. A copy that must rewrite a shared row (eviction, a span edit
        inside the prefix, a crop into it, parking, batch reordering) first copies the prefix into
        its own storage; this cache is never changed by its copies, and it must not change while
        they live (its rows would change under them). Windowed layers are copied. ``stats()`` of a
        copy counts only its own buffers. A cache with ``offload="layers"`` or a parked one is
        copied whole instead.
        """
        import copy

        if self._streamer is not None or self.parked:
            return copy.deepcopy(self)
        kv_layers = [(i, layer) for i, layer in enumerate(self.layers) if isinstance(layer, KVCompactLayer)]
        stores = [layer.storage for _, layer in kv_layers]
        try:
            for _, layer in kv_layers:
                layer.storage = None  # deep-copied below as shared views, not as tensors
            new = copy.deepcopy(self)
        finally:
            for (_, layer), store in zip(kv_layers, stores):
                layer.storage = store
        for i, layer in kv_layers:
            fresh = new.layers[i]
            fresh.reset()
            fresh.share_storage_of(layer)
        new.release_workspace()
        return new

    @property
    def shares_prefix(self) -> bool:
        """Whether any layer still reads rows shared with another cache (see :meth:`shared_copy`)."""
        return any(isinstance(layer, KVCompactLayer) and layer.storage.prefix is not None for layer in self.layers)

    def release_workspace(self) -> None:
        """Free the dequantization workspace (it is re-allocated by the next quantized update)."""
        self.workspace.release()

    def __repr__(self):
        return (
            f"KVCompactCache(kv_dtype={self.kv_dtype}, group_size={self.group_size}, budget={self.budget}, "
            f"layers={len(self.layers)}, logical={self.get_seq_length()})"
        )
