"""Token storage for one cache layer: preallocated buffers, optional 8-bit codes, a shared workspace.

Layout (every tensor is ``[B, H, capacity, ...]``, token dimension 2, rows ``[0, length)`` valid):

* lossless (``fmt=None``): ``keys``, ``values`` ``[B, H, cap, D]`` in the model dtype. ``view()``
  returns slices of them, so attention reads the cache with no copy.
* quantized: ``key_codes``, ``value_codes`` ``[B, H, cap, D]`` (float8/int8) and ``key_scales``,
  ``value_scales`` ``[B, H, cap, D // G]`` fp32. New tokens go in with one ``quantize_into_`` each;
  ``view()`` dequantizes into the cache-wide :class:`Workspace` and overwrites the newest tokens
  with their exact values (see ``view``).
* ``residual > 0`` adds a full-precision shadow of the newest tokens, ``[B, H, 2R, D]``: it holds
  physical positions ``[length - shadow_len, length)`` in rows ``[0, shadow_len)``. Tokens are
  quantized on arrival regardless, so dropping the shadow never loses a token.

Capacity grows geometrically by 1/16 (see ``reserve``) instead of a per-step ``torch.cat`` of the
whole cache (what ``DynamicCache`` does). The unused tail counts in ``device_bytes``, so it is
kept small.

Host-resident stores (``offload="layers"``): given a ``host_allocator``, a store keeps every buffer
in host memory handed out by that allocator (one pinned pool for the whole cache) and runs its
edits there with the CPU kernels; :meth:`TokenStore.device_twin` builds the store the forward
uses, over views of a device staging slot (see :mod:`kvcompact.cache.offload_layers`).
"""

from __future__ import annotations

import torch

from kvcompact import ops
from kvcompact.formats import FORMATS

_GROWTH = 1.25  # workspace growth: it is re-sized by every layer, so grow it faster
_ROUND = 64


def _round_up(n: int, m: int = _ROUND) -> int:
    return -(-n // m) * m


class Workspace:
    """One reusable dequantization buffer shared by all layers of a cache.

    Layers dequantize one at a time during a forward pass, so the peak extra memory is the largest
    single layer's K and V in the model dtype, not the whole cache. The price: a view returned by
    a quantized layer is overwritten by the next quantized layer's update.
    """

    def __init__(self):
        self._buf: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, count: int = 2):
        """``count`` contiguous tensors of ``shape`` carved from the shared buffer (grows if needed)."""
        numel = 1
        for s in shape:
            numel *= s
        need = numel * count
        buf = self._buf
        if buf is None or buf.dtype != dtype or buf.device != torch.device(device) or buf.numel() < need:
            size = need if buf is None or buf.dtype != dtype else max(need, int(buf.numel() * _GROWTH))
            self._buf = buf = torch.empty(size, dtype=dtype, device=device)
        return [buf[i * numel : (i + 1) * numel].view(shape) for i in range(count)]

    @property
    def nbytes(self) -> int:
        return 0 if self._buf is None else self._buf.numel() * self._buf.element_size()

    def release(self) -> None:
        self._buf = None


class TokenStore:
    """K/V storage for one layer; see the module docstring for the layout.

    Parameters
    ----------
    fmt : str or None
        None (model dtype, lossless) or one of :data:`FORMATS`.
    group_size : int or None
        Elements per scale along D (quantized only); None = the whole head.
    residual : int
        Newest tokens also kept in full precision (quantized only).
    workspace : Workspace
        The cache-wide dequantization buffer.
    host_allocator : callable, optional
        ``host_allocator([(shape, dtype), ...], store) -> [Tensor, ...]``: the store then lives in host
        memory (``device`` is the CPU whatever the model's device) and every buffer comes from it,
        all of one (re)allocation in one call, so a refused request changes nothing.
    """

    def __init__(self, fmt: str | None, group_size: int | None, residual: int, workspace: Workspace,
                 host_allocator=None):
        self.fmt = fmt
        self.group_size = group_size
        self.residual = residual if fmt is not None else 0
        self.workspace = workspace
        self.host_allocator = host_allocator
        self.length = 0  # physical tokens held (the shared prefix's rows included)
        self.shadow_len = 0
        # A read-only store whose first `prefix_len` rows are this store's rows [0, prefix_len)
        # (a prefix shared by several sessions); this store's own buffers then hold rows
        # [prefix_len, length). See share_prefix and unshare.
        self.prefix: "TokenStore | None" = None
        self.prefix_len = 0
        self.initialized = False
        # A staging copy (device_twin) over a fixed slot: it must never reallocate, since the slot,
        # not the store, owns its memory.
        self.fixed = False
        # The CUDA event of the last asynchronous copy into these (host) buffers, or None.
        self.pending_write = None

    # -- allocation ----------------------------------------------------------------------------

    def init(self, like: torch.Tensor) -> None:
        """Take B, H, D, dtype and device from ``like`` ``[B, H, *, D]``; allocate nothing yet."""
        self.batch, self.heads, _, self.head_dim = like.shape
        self.dtype = like.dtype
        self.device = torch.device("cpu") if self.host_allocator is not None else like.device
        if self.fmt is not None:
            g = self.group_size or self.head_dim
            if self.head_dim % g:
                raise ValueError(f"group_size={g} does not divide head_dim={self.head_dim}")
            self.groups = self.head_dim // g
        self.capacity = 0
        self._alloc(0)
        self.initialized = True

    def _shapes(self, cap: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        b, h, d = self.batch, self.heads, self.head_dim
        if self.fmt is None:
            return {"keys": ((b, h, cap, d), self.dtype), "values": ((b, h, cap, d), self.dtype)}
        code = FORMATS[self.fmt].dtype
        return {
            "key_codes": ((b, h, cap, d), code),
            "value_codes": ((b, h, cap, d), code),
            "key_scales": ((b, h, cap, self.groups), torch.float32),
            "value_scales": ((b, h, cap, self.groups), torch.float32),
        }

    def layout(self, cap: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """``(name, shape, dtype)`` of every buffer at capacity ``cap``: token buffers, then shadows."""
        out = [(name, shape, dtype) for name, (shape, dtype) in self._shapes(cap).items()]
        if self.residual:
            shape = (self.batch, self.heads, 2 * self.residual, self.head_dim)
            out += [("key_shadow", shape, self.dtype), ("value_shadow", shape, self.dtype)]
        return out

    def _new_tensors(self, specs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
        if self.host_allocator is not None:
            return self.host_allocator(specs, self)
        return [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in specs]

    def _alloc(self, cap: int, copy: bool = True) -> None:
        """(Re)allocate the token buffers to ``cap`` tokens, keeping rows ``[0, length)`` (unless
        ``copy=False``: the caller rewrites them). Everything is allocated before anything is
        replaced, so a refused allocation (``PoolExhaustedError``) leaves the store as it was."""
        if self.fixed:
            raise RuntimeError("TokenStore: a staging copy cannot reallocate (its slot owns the memory)")
        specs = list(self._shapes(cap).items())
        add_shadow = self.residual and getattr(self, "key_shadow", None) is None
        shadow_shape = (self.batch, self.heads, 2 * self.residual, self.head_dim)
        want = [spec for _, spec in specs] + ([(shadow_shape, self.dtype)] * 2 if add_shadow else [])
        new = self._new_tensors(want)
        own = self.own_length
        for (name, _), t in zip(specs, new):
            old = getattr(self, name, None)
            if copy and old is not None and own:
                t[:, :, :own].copy_(old[:, :, :own])
            setattr(self, name, t)
        self.capacity = cap
        if add_shadow:
            self.key_shadow, self.value_shadow = new[len(specs):]

    def reserve(self, extra: int) -> None:
        """Make room for ``extra`` more tokens.

        Growth is geometric, x(1 + 1/16), in 64-token steps: a decode step's attention already
        reads all T cached tokens, so copying T tokens once per T/16 steps adds about 1/16 of one
        attention read per step -- noise next to ``DynamicCache``'s full ``torch.cat`` every step
        -- while the unused tail, which counts in ``device_bytes``, stays under 6.25% + 64 tokens.
        """
        need = self.own_length + extra
        if need > self.capacity:
            grown = self.capacity + self.capacity // 16 if self.capacity else 0
            self._alloc(_round_up(max(need, grown)))

    def shrink(self, tokens: int, copy: bool = True) -> bool:
        """Give back capacity beyond ``tokens`` when it is at least twice what is needed.

        Called after a budget eviction: a long prompt grows the buffers to the prompt length,
        and compaction alone would leave that capacity allocated. Reallocating once (one copy of
        the kept tokens) makes the eviction free real memory; the 1.5x hysteresis keeps decode-time
        evictions (which leave about budget + slack of capacity) from reallocating.
        ``copy=False`` leaves the new buffers unwritten (the caller fills rows ``[0, length)``).
        Returns whether the buffers were reallocated.
        """
        if self.wants_shrink(tokens):
            self._alloc(_round_up(max(tokens - self.prefix_len, self.own_length)), copy=copy)
            return True
        return False

    def wants_shrink(self, tokens: int) -> bool:
        """Whether :meth:`shrink` (``tokens``) would reallocate."""
        return 2 * self.capacity > 3 * _round_up(max(tokens - self.prefix_len, self.own_length))

    # -- a shared, read-only prefix ----------------------------------------------------------------

    @property
    def own_length(self) -> int:
        """Rows held in this store's own buffers (``length`` less the shared prefix's rows)."""
        return self.length - self.prefix_len

    def share_prefix(self, prefix: "TokenStore") -> None:
        """Start this new, empty store with every row of ``prefix``, shared instead of copied.

        The rows are read in place by :meth:`view` and :meth:`attention_segments`; new tokens go
        to this store's own buffers. Anything that would rewrite a shared row (compaction, span
        edits, re-rotation, a crop into the prefix, batch reordering, export of the raw buffers)
        first copies the prefix into this store (:meth:`unshare`), so ``prefix`` itself never
        changes -- its owner (a ``PrefixCache``) must not change it either. The prefix's residual
        shadow is copied (it is at most ``2 * residual`` rows).
        """
        if self.initialized:
            raise ValueError("share_prefix: the store already holds tokens")
        if prefix.prefix is not None or prefix.host_allocator is not None or self.host_allocator is not None:
            raise ValueError("share_prefix: the prefix must be a device store that shares no prefix itself")
        if (prefix.fmt, prefix.group_size, prefix.residual) != (self.fmt, self.group_size, self.residual):
            raise ValueError(f"share_prefix: storage (fmt, group_size, residual) differs: prefix "
                             f"{(prefix.fmt, prefix.group_size, prefix.residual)}, this store "
                             f"{(self.fmt, self.group_size, self.residual)}")
        self.batch, self.heads, self.head_dim = prefix.batch, prefix.heads, prefix.head_dim
        self.dtype, self.device = prefix.dtype, prefix.device
        if self.fmt is not None:
            self.groups = prefix.groups
        self.capacity = 0
        self._alloc(0)
        self.initialized = True
        self.prefix, self.prefix_len, self.length = prefix, prefix.length, prefix.length
        if self.residual and prefix.shadow_len:
            s = prefix.shadow_len
            self.key_shadow[:, :, :s].copy_(prefix.key_shadow[:, :, :s])
            self.value_shadow[:, :, :s].copy_(prefix.value_shadow[:, :, :s])
            self.shadow_len = s

    def unshare(self) -> None:
        """Copy the shared prefix's rows into this store's own buffers (copy on write); no-op
        without a shared prefix."""
        if self.prefix is None:
            return
        prefix, p, own = self.prefix, self.prefix_len, self.own_length
        cap = _round_up(self.length)
        specs = self._shapes(cap)
        new = self._new_tensors(list(specs.values()))
        for name, t in zip(specs, new):
            t[:, :, :p].copy_(getattr(prefix, name)[:, :, :p])
            if own:
                t[:, :, p : p + own].copy_(getattr(self, name)[:, :, :own])
            setattr(self, name, t)
        self.capacity = cap
        self.prefix, self.prefix_len = None, 0

    # -- the hot path --------------------------------------------------------------------------

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write ``key``/``value`` ``[B, H, Q, D]`` at rows ``[length, length + Q)``."""
        q = key.shape[2]
        self.reserve(q)
        a, b = self.own_length, self.own_length + q
        if self.fmt is None:
            self.keys[:, :, a:b].copy_(key)
            self.values[:, :, a:b].copy_(value)
        else:
            ops.quantize_into_(key, self.key_codes[:, :, a:b], self.key_scales[:, :, a:b], self.fmt)
            ops.quantize_into_(value, self.value_codes[:, :, a:b], self.value_scales[:, :, a:b], self.fmt)
            if self.residual:
                self._shadow_append(key, value)
        self.length += q

    def _shadow_append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        q, r = key.shape[2], self.residual
        if q >= r:  # the chunk alone fills the window
            self.key_shadow[:, :, :r].copy_(key[:, :, q - r :])
            self.value_shadow[:, :, :r].copy_(value[:, :, q - r :])
            self.shadow_len = r
            return
        if self.shadow_len + q > 2 * r:
            # Slide the newest r - q tokens to the front; clone because source and target overlap.
            keep = r - q
            s = self.shadow_len
            self.key_shadow[:, :, :keep].copy_(self.key_shadow[:, :, s - keep : s].clone())
            self.value_shadow[:, :, :keep].copy_(self.value_shadow[:, :, s - keep : s].clone())
            self.shadow_len = keep
        s = self.shadow_len
        self.key_shadow[:, :, s : s + q].copy_(key)
        self.value_shadow[:, :, s : s + q].copy_(value)
        self.shadow_len = s + q

    def view(self, start: int = 0, exact_key=None, exact_value=None, fresh: bool = False):
        """Keys and values at physical rows ``[start, length)``, ``[B, H, length - start, D]``.

        Lossless: slices of the buffers (valid until this layer's next update). Quantized:
        dequantized into the shared workspace (valid until any quantized layer of the cache updates),
        then the newest tokens are overwritten with exact values: the residual shadow, and
        ``exact_key``/``exact_value`` ``[B, H, Q, D]`` (the tokens just appended), which are free to
        use -- a query attending to its own chunk need not see quantization error.
        ``fresh=True`` dequantizes into new tensors instead, leaving the workspace (which
        attention may be reading) alone.
        """
        n = self.length
        if self.fmt is None and self.prefix is None:
            return self.keys[:, :, start:n], self.values[:, :, start:n]
        if exact_key is not None and exact_key.shape[2] >= n - start:
            # Every row asked for was just appended (a first prefill): its exact values are the
            # answer, and the workspace is not touched.
            q = n - start
            return exact_key[:, :, exact_key.shape[2] - q:], exact_value[:, :, exact_value.shape[2] - q:]
        shape = (self.batch, self.heads, n - start, self.head_dim)
        if fresh:
            key_out = torch.empty(shape, dtype=self.dtype, device=self.device)
            value_out = torch.empty(shape, dtype=self.dtype, device=self.device)
        else:
            key_out, value_out = self.workspace.take(shape, self.dtype, self.device)
        at = 0
        for store, lo, hi in self._row_sources(start, n):
            store._read_rows(lo, hi, key_out[:, :, at : at + hi - lo], value_out[:, :, at : at + hi - lo])
            at += hi - lo
        r = min(self.residual, self.shadow_len, n - start)
        if r:
            s = self.shadow_len
            key_out[:, :, -r:].copy_(self.key_shadow[:, :, s - r : s])
            value_out[:, :, -r:].copy_(self.value_shadow[:, :, s - r : s])
        if exact_key is not None:
            q = min(exact_key.shape[2], n - start)
            key_out[:, :, -q:].copy_(exact_key[:, :, -q:])
            value_out[:, :, -q:].copy_(exact_value[:, :, -q:])
        return key_out, value_out

    def _row_sources(self, start: int, end: int) -> list[tuple["TokenStore", int, int]]:
        """Rows ``[start, end)`` as ``(store, lo, hi)`` pieces in each store's own buffer rows: the
        shared prefix's, then this store's."""
        pieces, p = [], self.prefix_len
        if start < min(end, p):
            pieces.append((self.prefix, start, min(end, p)))
        if end > max(start, p):
            pieces.append((self, max(start, p) - p, end - p))
        return pieces

    def _read_rows(self, lo: int, hi: int, key_out: torch.Tensor, value_out: torch.Tensor) -> None:
        """Own buffer rows ``[lo, hi)`` into ``key_out``/``value_out`` (dequantized when 8-bit)."""
        if self.fmt is None:
            key_out.copy_(self.keys[:, :, lo:hi])
            value_out.copy_(self.values[:, :, lo:hi])
        else:
            ops.dequantize_into_(self.key_codes[:, :, lo:hi], self.key_scales[:, :, lo:hi], key_out)
            ops.dequantize_into_(self.value_codes[:, :, lo:hi], self.value_scales[:, :, lo:hi], value_out)

    def _stored_segment(self, lo: int, hi: int):
        """Own buffer rows ``[lo, hi)`` as a ``decode_attention`` segment ``(key, value, scales...)``."""
        if self.fmt is None:
            return self.keys[:, :, lo:hi], self.values[:, :, lo:hi], None, None
        return (self.key_codes[:, :, lo:hi], self.value_codes[:, :, lo:hi], self.key_scales[:, :, lo:hi],
                self.value_scales[:, :, lo:hi])

    def attention_segments(self, start: int, exact_key: torch.Tensor, exact_value: torch.Tensor):
        """What :meth:`view` returns, as ``decode_attention`` inputs read in place (no workspace).

        Rows ``[start, length)`` as ``(segments, tail)``. ``segments`` is a list of
        ``(key, value, key_scales, value_scales, offset)`` over the stored rows, ``offset`` the
        segment's first row counted from ``start``. ``tail`` is None for lossless storage (one
        segment over the buffers); quantized, it is ``(key, value)`` ``[B, H, E, D]``, the newest
        ``E`` rows in full precision -- the residual shadow's and ``exact_key``/``exact_value``
        ``[B, H, Q, D]``, the chunk just appended -- as :meth:`view` overwrites them, so both
        paths attend to the same values. The tail follows the last segment's rows.
        """
        n = self.length
        if self.fmt is None:
            return [(*store._stored_segment(lo, hi), at - start)
                    for (store, lo, hi), at in self._with_offsets(start, n)], None
        q = min(exact_key.shape[2], n - start)
        exact = max(min(self.residual, self.shadow_len, n - start), q)
        key_tail, value_tail = exact_key[:, :, exact_key.shape[2] - q:], exact_value[:, :, exact_value.shape[2] - q:]
        if exact > q:  # older shadow rows in front of the new chunk (a small copy: at most `residual` rows)
            s = self.shadow_len
            key_tail = torch.cat([self.key_shadow[:, :, s - exact : s - q], key_tail], dim=2)
            value_tail = torch.cat([self.value_shadow[:, :, s - exact : s - q], value_tail], dim=2)
        segments = [(*store._stored_segment(lo, hi), at - start)
                    for (store, lo, hi), at in self._with_offsets(start, n - exact)]
        return segments, (key_tail, value_tail)

    def _with_offsets(self, start: int, end: int):
        """:meth:`_row_sources` pieces with the row each one starts at."""
        at = start
        for piece in self._row_sources(start, end):
            yield piece, at
            at += piece[2] - piece[1]

    # -- structural edits ----------------------------------------------------------------------

    def token_tensors(self) -> list[torch.Tensor]:
        """Every ``[B, H, cap, ...]`` buffer, in the order compaction should see them (a shared
        prefix is copied in first: callers index them by row)."""
        self.unshare()
        return [getattr(self, name) for name in self._shapes(0)]

    def token_names(self) -> list[str]:
        """Names of :meth:`token_tensors` (the buffers indexed by token; shadows excluded)."""
        return list(self._shapes(0))

    def compact(self, keep_idx: torch.Tensor, validate: bool = True) -> None:
        """Keep physical rows ``keep_idx`` ``[B, H, K]`` (int64, strictly increasing per row), in place.

        ``validate=False`` skips the kernel's check of ``keep_idx`` (a pass over it and, on a GPU, a
        host sync) for indices built by kvcompact itself.
        """
        n, k = self.length, keep_idx.shape[-1]
        ops.compact_(self.token_tensors(), keep_idx, validate=validate)  # unshares
        if self.shadow_len:
            # Kept shadow tokens form a suffix of each row; keep the count all rows share.
            base = n - self.shadow_len
            c = int((keep_idx >= base).sum(-1).min())
            if c:
                idx = (keep_idx[..., k - c :] - base).unsqueeze(-1).expand(-1, -1, -1, self.head_dim)
                self.key_shadow[:, :, :c].copy_(torch.gather(self.key_shadow[:, :, : self.shadow_len], 2, idx))
                self.value_shadow[:, :, :c].copy_(torch.gather(self.value_shadow[:, :, : self.shadow_len], 2, idx))
            self.shadow_len = c
        self.length = k

    def drop_rows(self, start: int, end: int) -> None:
        """Remove physical rows ``[start, end)`` in place (``compact_`` with one shared ``keep_idx``).

        The residual shadow is dropped: its rows are addressed from the end and no longer match.
        """
        n = self.length
        if end <= start:
            return
        keep = torch.cat([torch.arange(0, start), torch.arange(end, n)]).to(self.device)
        keep = keep.view(1, 1, -1).expand(self.batch, self.heads, -1).contiguous()
        ops.compact_(self.token_tensors(), keep, validate=False)
        self.length = n - (end - start)
        self.shadow_len = 0

    def move_rows(self, src_start: int, src_end: int, dst_start: int) -> None:
        """memmove rows ``[src_start, src_end)`` to ``dst_start`` (growing the buffers if needed)."""
        if src_end <= src_start or src_start == dst_start:
            return
        self.unshare()  # before reserve: both count rows of this store's own buffers
        self.reserve(max(0, dst_start + (src_end - src_start) - self.length))
        ops.move_(self.token_tensors(), src_start, src_end, dst_start)

    def rotate_keys(self, start: int, end: int, delta: int, inv_freq: torch.Tensor, style: str) -> None:
        """Re-rotate the keys at rows ``[start, end)`` by ``delta`` positions (RoPE composes)."""
        if delta == 0 or end <= start:
            return
        self.unshare()
        d = torch.full((end - start,), int(delta), dtype=torch.int64, device=self.device)
        inv = inv_freq.to(self.device, torch.float32)
        if self.fmt is None:
            ops.rope_shift_(self.keys[:, :, start:end], d, inv, style)
        else:
            ops.rope_shift_quantized_(self.key_codes[:, :, start:end], self.key_scales[:, :, start:end], d, inv,
                                      style)
        self.shadow_len = 0  # the full-precision shadow holds unrotated keys

    def overwrite_rows(self, rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write ``key``/``value`` ``[B, H, m, D]`` (model dtype) at physical rows ``rows`` ``[m]``.

        8-bit storage quantizes them first (the same kernel as :meth:`append`), and rows inside the
        residual window get their exact values there too, so the store reads back as if those rows
        had been appended with these values.
        """
        self.unshare()
        if self.fmt is None:
            self.keys.index_copy_(2, rows, key.to(self.dtype))
            self.values.index_copy_(2, rows, value.to(self.dtype))
        else:
            shapes = self._shapes(rows.numel())
            for x, codes, scales in ((key, "key_codes", "key_scales"), (value, "value_codes", "value_scales")):
                new_codes = torch.empty(shapes[codes][0], dtype=shapes[codes][1], device=self.device)
                new_scales = torch.empty(shapes[scales][0], dtype=torch.float32, device=self.device)
                ops.quantize_into_(x.to(self.dtype).contiguous(), new_codes, new_scales, self.fmt)
                # as bytes: index_copy_ has no fp8 kernel, and a copy of codes is a copy of bytes
                getattr(self, codes).view(torch.uint8).index_copy_(2, rows, new_codes.view(torch.uint8))
                getattr(self, scales).index_copy_(2, rows, new_scales)
        if self.shadow_len:
            # Shadow row j holds physical row length - shadow_len + j.
            base = self.length - self.shadow_len
            inside = rows >= base
            if bool(inside.any()):
                at = rows[inside] - base
                self.key_shadow.index_copy_(2, at, key[:, :, inside].to(self.dtype))
                self.value_shadow.index_copy_(2, at, value[:, :, inside].to(self.dtype))

    def copy_rows(self, start: int, end: int) -> list[torch.Tensor]:
        """Copies of rows ``[start, end)`` of every token buffer (a backup an edit can roll back to)."""
        return [t[:, :, start:end].clone() for t in self.token_tensors()]

    def write_rows(self, start: int, rows: list[torch.Tensor]) -> None:
        """Write ``copy_rows``'s tensors back at row ``start``."""
        for t, r in zip(self.token_tensors(), rows):
            t[:, :, start:start + r.shape[2]].copy_(r)

    def copy_shadow(self) -> list[torch.Tensor]:
        """Copies of the residual shadow's valid rows (empty without one)."""
        if not (self.residual and self.shadow_len):
            return []  # (the shadow is this store's own, even with a shared prefix)
        return [t[:, :, : self.shadow_len].clone() for t in (self.key_shadow, self.value_shadow)]

    def write_shadow(self, rows: list[torch.Tensor]) -> None:
        """Put ``copy_shadow``'s tensors back (``shadow_len`` is the caller's to restore)."""
        for t, r in zip((self.key_shadow, self.value_shadow) if rows else (), rows):
            t[:, :, : r.shape[2]].copy_(r)

    # -- whole state (checkpoints, parking) ------------------------------------------------------

    def buffer_names(self) -> list[str]:
        """Names of every buffer: the token buffers, then the residual shadows."""
        return list(self._shapes(0)) + (["key_shadow", "value_shadow"] if self.residual else [])

    def buffers(self) -> list[torch.Tensor]:
        """Every buffer, in :meth:`buffer_names` order (a shared prefix is copied in first: callers
        move or replace the buffers whole)."""
        self.unshare()
        return [getattr(self, name) for name in self.buffer_names()]

    def buffers_view(self) -> list[torch.Tensor]:
        """This store's own buffers, as they are (a shared prefix stays shared): for accounting."""
        return [getattr(self, name) for name in self.buffer_names()]

    def set_buffers(self, tensors: list[torch.Tensor]) -> None:
        """Put back :meth:`buffers`' tensors (same order; parking swaps device and host copies)."""
        names = self.buffer_names()
        if len(tensors) != len(names):
            raise ValueError(f"set_buffers: expected {len(names)} tensors ({names}), got {len(tensors)}")
        for name, t in zip(names, tensors):
            setattr(self, name, t)

    @property
    def released(self) -> bool:
        """True while the buffers are 0-element placeholders (a parked cache's layers)."""
        return self.initialized and self.capacity > 0 and getattr(self, self.buffer_names()[0]).numel() == 0

    def valid_rows(self) -> dict[str, torch.Tensor]:
        """Views of the rows that hold tokens: ``[:, :, :length]`` of the token buffers and
        ``[:, :, :shadow_len]`` of the shadows (omitted when empty)."""
        if self.prefix is not None:  # a copy joining the shared rows and ours; neither changes
            p, own = self.prefix_len, self.own_length
            out = {name: torch.cat([getattr(self.prefix, name)[:, :, :p], getattr(self, name)[:, :, :own]], dim=2)
                   for name in self._shapes(0)}
        else:
            out = {name: getattr(self, name)[:, :, : self.length] for name in self._shapes(0)}
        if self.residual and self.shadow_len:
            for name in ("key_shadow", "value_shadow"):
                out[name] = getattr(self, name)[:, :, : self.shadow_len]
        return out

    def load_rows(self, tensors: dict[str, torch.Tensor], length: int, shadow_len: int) -> None:
        """Fill an initialised, empty store from :meth:`valid_rows`-shaped tensors.

        Raises ``ValueError`` naming a missing or mis-shaped tensor before anything is written.
        """
        want = {name: (self.batch, self.heads, length, shape[-1]) for name, (shape, _) in self._shapes(0).items()}
        if self.residual and shadow_len:
            for name in ("key_shadow", "value_shadow"):
                want[name] = (self.batch, self.heads, shadow_len, self.head_dim)
        for name, shape in want.items():
            t = tensors.get(name)
            if t is None or tuple(t.shape) != shape:
                got = None if t is None else tuple(t.shape)
                raise ValueError(f"tensor {name!r}: expected shape {shape}, got {got}")
        self.unshare()
        self.reserve(length)
        for name, shape in want.items():
            getattr(self, name)[:, :, : shape[2]].copy_(tensors[name])
        self.length = length
        self.shadow_len = shadow_len if self.residual else 0

    def keep_last(self, count: int) -> None:
        """Keep only the newest ``count`` physical tokens (sliding windows). Pure torch: no kernel."""
        n = self.length
        if count >= n:
            return
        for t in self.token_tensors():  # unshares
            # Source and target overlap when count > n - count; a clone of `count` rows is
            # amortised over the window, as callers trim only when the buffer is full.
            t[:, :, :count].copy_(t[:, :, n - count : n].clone())
        self.length = count
        self.shadow_len = min(self.shadow_len, count)

    def truncate(self, count: int) -> None:
        """Drop the newest ``count`` physical tokens."""
        count = min(count, self.length)
        if count > self.own_length:  # the crop reaches into the shared rows
            self.unshare()
        self.length -= count
        self.shadow_len = max(self.shadow_len - count, 0)

    def map_batch(self, fn) -> None:
        """Replace every buffer ``t`` by ``fn(t)`` along the batch dim (reorder, select, repeat)."""
        if not self.initialized:
            return
        self.unshare()
        names = self.buffer_names()
        mapped = [fn(getattr(self, name)) for name in names]
        if self.host_allocator is not None:  # keep host-resident buffers in the cache's pool
            homes = self.host_allocator([(tuple(t.shape), t.dtype) for t in mapped], self)
            for home, t in zip(homes, mapped):
                home.copy_(t)
            mapped = homes
        for name, t in zip(names, mapped):
            setattr(self, name, t)
        self.batch = getattr(self, names[0]).shape[0]

    # -- host residency (offload="layers") ------------------------------------------------------

    def wait_pending(self) -> None:
        """Block until the last asynchronous copy into these buffers has landed (no-op on CPU)."""
        if self.pending_write is not None:
            self.pending_write.synchronize()
            self.pending_write = None

    def device_twin(self, carve, device, capacity: int) -> "TokenStore":
        """A store with this one's layout and lengths over memory ``carve`` hands out.

        ``carve(shape, dtype) -> Tensor`` returns views of a staging slot on ``device``; the twin
        has ``capacity`` token rows (at least ``length``), shares the workspace, and refuses to
        reallocate. Its contents are the caller's to copy in.
        """
        self.unshare()
        twin = TokenStore(self.fmt, self.group_size, self.residual, self.workspace)
        twin.batch, twin.heads, twin.head_dim, twin.dtype = self.batch, self.heads, self.head_dim, self.dtype
        if self.fmt is not None:
            twin.groups = self.groups
        twin.device = torch.device(device)
        for name, shape, dtype in self.layout(capacity):
            setattr(twin, name, carve(shape, dtype))
        twin.capacity, twin.length, twin.shadow_len = capacity, self.length, self.shadow_len
        twin.initialized, twin.fixed = True, True
        return twin

    # -- accounting ----------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Device bytes held (capacity included, workspace excluded: it belongs to the cache)."""
        if not self.initialized:
            return 0
        # Own buffers only: a shared prefix's bytes belong to its owner (counted there, once).
        return sum(t.numel() * t.element_size() for t in self.buffers_view())

    def dense_bytes(self, tokens: int) -> int:
        """What ``tokens`` tokens of K and V take in the model dtype."""
        if not self.initialized:
            return 0
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.batch * self.heads * tokens * self.head_dim * elem
