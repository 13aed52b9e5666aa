"""Span edits and whole-state export/import: the cache's API for code above it (agent, server).

A message's span is the same physical row range in every layer and head of a cache without a
token budget, so every edit here applies to all attention layers identically, in place, with the
kvcompact kernels. Each method checks every layer before it changes any: a refused edit changes
nothing, and :meth:`SpanEditsMixin.splice` rolls back if the model's forward fails.

* :meth:`~SpanEditsMixin.drop_span` -- ``compact_`` rows ``[start, end)`` out. The logical length
  (next position) is kept, leaving a gap of positions; ``reposition=True`` instead re-rotates the
  later keys by ``-(end - start)`` (RoPE rotations compose: rotating by ``p`` then ``delta`` equals
  rotating by ``p + delta``) and shrinks the logical length. Values carry no position.
* :meth:`~SpanEditsMixin.splice` -- replace rows ``[start, end)`` by the KV of new tokens the model
  computes against the rows before ``start`` only (``move_`` opens or closes the gap).
* :meth:`~SpanEditsMixin.rewriting` -- while active, the model's forward over some already-cached
  tokens writes their new K/V over their own rows instead of appending (bounded repair of the
  tokens after an edit).
* :meth:`~SpanEditsMixin.export_state` / :meth:`~SpanEditsMixin.import_state` -- the valid rows of
  every buffer and the length bookkeeping (checkpoints);
  :meth:`~SpanEditsMixin.storage_tensors` / :meth:`~SpanEditsMixin.replace_storage_tensors` --
  the buffers themselves (parking to host memory).

Callers never touch a layer's storage or lengths; these methods are the whole interface.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from kvcompact.cache.layer import KVCompactLayer

__all__ = ["SpanEditsMixin"]


class _StopRewrite(Exception):
    """Ends a forward inside :meth:`SpanEditsMixin.rewriting` when its observer asks to."""


class SpanEditsMixin:
    """Mixed into :class:`~kvcompact.cache.KVCompactCache` (needs ``self.layers`` and ``self.budget``)."""

    def _settle_offload(self) -> None:
        """Hook: make the storage's host copies the truth (``offload="layers"``; see the cache)."""

    # -- what can be edited ----------------------------------------------------------------------

    def _attention_layers(self) -> list[KVCompactLayer]:
        return [layer for layer in self.layers if isinstance(layer, KVCompactLayer)]

    def _used_layers(self) -> list[KVCompactLayer]:
        return [layer for layer in self._attention_layers() if layer.is_initialized]

    def check_editable(self) -> None:
        """Raise ``ValueError`` unless span edits are possible on this cache.

        A token budget evicts per head, after which a message no longer occupies one row range in
        every head; a sliding-window layer forgets old rows by itself.
        """
        if self.budget is not None:
            raise ValueError(
                f"span edits need a cache without a token budget (got budget={self.budget}): a budget evicts "
                "tokens per head, after which a message no longer occupies one token range in every head; use "
                "drop() / compact_messages for memory instead")
        layers = self._attention_layers()
        if not layers or len(layers) != len(self.layers) or any(layer.is_sliding for layer in layers):
            raise ValueError("span edits need a KVCompactCache whose layers are all full attention "
                             "(sliding-window layers cannot hold arbitrary message spans)")

    @property
    def physical_length(self) -> int:
        """Physical tokens held (the same in every full-attention layer; 0 before the first update)."""
        layers = self._used_layers()
        return layers[0].physical_len if layers else 0

    def _check_span(self, op: str, start: int, end: int) -> list[KVCompactLayer]:
        self.check_editable()
        layers = self._used_layers()
        for layer in layers:
            layer.check_rows(op, start, end)
        if not layers and (start, end) != (0, 0):
            raise ValueError(f"{op}: rows [{start}, {end}) are outside the 0 cached tokens")
        return layers

    @staticmethod
    def _check_rope(op: str, rope) -> None:
        if rope is None or not hasattr(rope, "inv_freq") or not hasattr(rope, "style"):
            raise ValueError(f"{op}: rope must be a kvcompact.rope.RotaryParams (see kvcompact.rope.rope_params), "
                             f"got {rope!r}")

    # -- edits -----------------------------------------------------------------------------------

    def drop_span(self, start: int, end: int, *, reposition: bool = False, rope=None) -> int:
        """Evict physical rows ``[start, end)`` of every layer in place; returns the rows removed.

        Parameters
        ----------
        start, end : int
            The span, ``0 <= start <= end <= physical_length``.
        reposition : bool
            False: later tokens keep their positions (a gap remains; the logical length is
            unchanged). True: the keys after the span are re-rotated by ``-(end - start)`` and the
            logical length shrinks by as much, as if the span had never been there.
        rope : kvcompact.rope.RotaryParams
            The model's rotary parameters (needed with ``reposition=True``).
        """
        layers = self._check_span("drop_span", start, end)
        length = end - start
        if reposition and length:
            self._check_rope("drop_span", rope)
        for layer in layers:
            layer.drop_rows(start, end)
        if reposition and length:
            tail_end = self.physical_length
            for layer in layers:
                layer.rotate_keys(start, tail_end, -length, rope.inv_freq, rope.style)
                layer.shift_positions(length)
        return length

    def shift_keys(self, start: int, end: int, delta: int, rope) -> None:
        """Re-rotate the keys at physical rows ``[start, end)`` of every layer by ``delta`` positions.

        Only the keys change; the logical length does not (use ``drop_span(reposition=True)`` to
        close a gap).
        """
        layers = self._check_span("shift_keys", start, end)
        self._check_rope("shift_keys", rope)
        for layer in layers:
            layer.rotate_keys(start, end, int(delta), rope.inv_freq, rope.style)

    def splice(self, start: int, end: int, new_len: int, *, position: int, forward: Callable[[], None],
               rope) -> None:
        """Replace physical rows ``[start, end)`` by ``new_len`` tokens that ``forward()`` feeds the model.

        Parameters
        ----------
        start, end : int
            The span to replace.
        new_len : int
            Tokens ``forward`` feeds (``>= 0``).
        position : int
            RoPE position of row ``start``: the new tokens take ``position ... position + new_len - 1``.
        forward : callable
            Runs the model on exactly the ``new_len`` new tokens with this cache. While it runs the
            cache shows only rows ``[0, start)`` (logical length ``position``), so the new tokens
            attend to what precedes them and to nothing after.
        rope : kvcompact.rope.RotaryParams
            Used to re-rotate the tail by the length change ``new_len - (end - start)``.

        If ``forward`` raises, or writes another number of tokens than ``new_len``, the cache is put
        back exactly as it was (rows, residual shadow, lengths) and the original exception
        propagates (a wrong count raises ``RuntimeError``). The rollback keeps a copy of the
        replaced rows while ``forward`` runs: memory proportional to the span, not the cache.
        """
        layers = self._check_span("splice", start, end)
        self._check_rope("splice", rope)
        if not isinstance(new_len, int) or new_len < 0:
            raise ValueError(f"splice: new_len must be an int >= 0, got {new_len!r}")
        if not layers:
            forward()
            return
        n = layers[0].physical_len
        delta = new_len - (end - start)
        # Everything the edit may overwrite, taken before anything changes: the replaced rows (the
        # move and the forward write over them) and each layer's bookkeeping.
        saved = [(layer.snapshot(), layer.storage.copy_rows(start, end) + layer.storage.copy_shadow())
                 for layer in layers]
        try:
            for layer in layers:
                layer.open_splice(start, end, new_len, position)
            forward()
            self._settle_offload()  # offload="layers": the forward's last layer back to its host copy
            wrote = [layer.physical_len - start for layer in layers]
            if any(w != new_len for w in wrote):
                raise RuntimeError(f"splice: forward() wrote {sorted(set(wrote))} tokens per layer, expected {new_len}")
        except BaseException:
            self._settle_offload()
            for layer, (snap, rows) in zip(layers, saved):
                self._roll_back_splice(layer, start, end, new_len, snap, rows)
            raise
        for layer, (snap, _) in zip(layers, saved):
            layer.close_splice(start, end, new_len, snap)
        if delta:
            tail_start = start + new_len
            self.shift_keys(tail_start, tail_start + (n - end), delta, rope)

    @contextlib.contextmanager
    def rewriting(self, rows, *, observe: Callable | None = None):
        """Recompute cached rows in place: while active, ``update`` overwrites instead of appending.

        Inside the ``with`` block, one forward of ``m == len(rows)`` tokens (the caller passes their
        RoPE positions as ``position_ids`` and a 4-D attention mask over the physical rows) makes
        ``update(key, value, layer_idx)`` write the new keys/values over physical rows ``rows`` of
        that layer and return the layer's whole K/V ``[0, physical_length)``. The lengths do not
        change. Rewrite many rows in chunks with one block per forward, in row order.

        Parameters
        ----------
        rows : sequence of int or 1-D int64 tensor
            Physical rows, strictly increasing, each in ``[0, physical_length)``.
        observe : callable, optional
            ``observe(layer_idx, rows, new_key, new_value, old_key, old_value)`` before each layer's
            write, with the ``[B, H, m, D]`` K/V computed now and those the rows held (dequantized).
            Returning True stops the forward right after this layer's write (the ``with`` block
            then ends quietly): the layers written so far keep their new rows, which is the point
            (a bounded repair scores the rows at an early layer and stops there).

        Raises ``ValueError`` (nothing changed) for a cache span edits cannot apply to, with
        ``offload="layers"``, or bad ``rows``.
        """
        layers = self._check_span("rewriting", 0, self.physical_length)
        if getattr(self, "_streamer", None) is not None:
            raise ValueError('rewriting: not available with offload="layers" (its staging slots hold one '
                             "layer at a time); use a cache without layer offload")
        n = layers[0].physical_len if layers else 0
        device = layers[0].storage.device if layers else torch.device("cpu")
        rows = torch.as_tensor(rows, dtype=torch.int64).flatten().to(device)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n or bool((rows[1:] <= rows[:-1]).any())):
            raise ValueError(f"rewriting: rows must be strictly increasing and inside the {n} cached rows; "
                             f"got {rows.tolist()[:8]}{'...' if rows.numel() > 8 else ''}")
        if self._rewrite is not None:
            raise ValueError("rewriting: already rewriting (blocks do not nest)")
        self._rewrite = (rows, observe)
        try:
            yield
        except _StopRewrite:
            pass
        finally:
            self._rewrite = None

    def _rewrite_layer(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor):
        """``update`` inside :meth:`rewriting`: overwrite the block's rows, return the whole layer."""
        rows, observe = self._rewrite
        if key.shape[2] != rows.numel():
            raise RuntimeError(f"rewriting: a forward of {key.shape[2]} tokens over {rows.numel()} rows")
        storage = self.layers[layer_idx].storage
        stop = False
        if observe is not None:
            old_key, old_value = storage.view(fresh=True)
            stop = observe(layer_idx, rows, key, value, old_key.index_select(2, rows), old_value.index_select(2, rows))
        storage.overwrite_rows(rows, key, value)
        if stop:
            raise _StopRewrite
        return storage.view()

    @staticmethod
    def _roll_back_splice(layer: KVCompactLayer, start: int, end: int, new_len: int, snap, rows) -> None:
        """Undo ``open_splice`` and whatever ``forward`` wrote: tail back to ``end``, old rows back."""
        n = snap[0]
        tail = n - end
        store = layer.storage
        token_rows = len(store.token_tensors())
        store.move_rows(start + new_len, start + new_len + tail, end)
        store.write_rows(start, rows[:token_rows])
        store.write_shadow(rows[token_rows:])  # the forward's appends went through the shadow too
        layer.restore(snap)

    # -- whole state -----------------------------------------------------------------------------

    def export_state(self) -> tuple[dict[str, torch.Tensor], list[dict | None]]:
        """The valid rows of every buffer and each layer's bookkeeping (views, nothing copied).

        Returns
        -------
        tensors : dict of str to torch.Tensor
            ``"{buffer}.{i}"`` for attention layer ``i`` (the ``i``-th :class:`KVCompactLayer`):
            ``keys``/``values`` (lossless) or ``key_codes``/``value_codes``/``key_scales``/
            ``value_scales`` (8-bit), ``[B, H, physical, ...]``; ``key_shadow``/``value_shadow``
            ``[B, H, shadow_len, D]`` with a residual window.
        layers : list of dict or None
            Per attention layer: ``physical``, ``logical``, ``tail_contiguous``, ``shadow_len``,
            ``dtype``, ``shape`` ``[B, H, D]``; None for a layer that holds nothing yet.
        """
        tensors, layers = {}, []
        for i, layer in enumerate(self._attention_layers()):
            state = layer.export_state()
            if state is None:
                layers.append(None)
                continue
            rows, meta = state
            tensors.update({f"{name}.{i}": t for name, t in rows.items()})
            layers.append(meta)
        return tensors, layers

    def import_state(self, tensors: dict[str, torch.Tensor], layers: list[dict | None], device=None) -> None:
        """Load :meth:`export_state`'s output into this empty cache (built with the same options).

        Raises ``ValueError`` naming the layer and tensor that is missing or mis-shaped; the cache
        is then left empty.
        """
        own = self._attention_layers()
        if len(layers) != len(own):
            raise ValueError(f"import_state: {len(layers)} layers given, the cache has {len(own)}")
        if self.get_seq_length():
            raise ValueError("import_state: the cache already holds tokens (use a new cache or reset() it)")
        try:
            for i, (layer, meta) in enumerate(zip(own, layers)):
                if meta is None:
                    continue
                prefix = f".{i}"
                rows = {k[: -len(prefix)]: t for k, t in tensors.items() if k.endswith(prefix)}
                try:
                    layer.import_state(rows, meta, device if device is not None else self._device_of(rows))
                except ValueError as e:
                    raise ValueError(f"import_state: layer {i}: {e}") from None
        except BaseException:
            self.reset()
            raise

    @staticmethod
    def _device_of(rows: dict[str, torch.Tensor]):
        return next(iter(rows.values())).device if rows else torch.device("cpu")

    def storage_tensors(self) -> list[torch.Tensor]:
        """Every buffer of every initialised attention layer, in a fixed order (capacity included)."""
        return [t for layer in self._used_layers() for t in layer.storage.buffers()]

    def replace_storage_tensors(self, tensors: list[torch.Tensor] | None) -> None:
        """Swap in tensors for :meth:`storage_tensors` (same order and shapes); None releases them.

        Parking moves the buffers to host memory and back: ``None`` leaves 0-element placeholders
        (the device memory returns to the allocator), the restored tensors go back in the same order.
        """
        layers = self._used_layers()
        current = [layer.storage.buffers() for layer in layers]
        if tensors is None:
            for layer, bufs in zip(layers, current):
                layer.storage.set_buffers([t.new_empty((0,) * t.dim()) for t in bufs])
            return
        tensors = list(tensors)
        want = sum(len(b) for b in current)
        if len(tensors) != want:
            raise ValueError(f"replace_storage_tensors: expected {want} tensors, got {len(tensors)}")
        i = 0
        for layer, bufs in zip(layers, current):
            chunk = tensors[i:i + len(bufs)]
            i += len(bufs)
            layer.storage.set_buffers(chunk)
