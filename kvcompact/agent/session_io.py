"""Session checkpoints: :meth:`Session.save` / :meth:`Session.load` over ``checkpoint.py``.

Tensors (the cache's ``export_state()``, one safetensors file per family, see
``write_checkpoint``): for every attention layer ``i`` the valid rows ``[:, :, :length]`` of each
buffer -- ``keys.i``/``values.i`` (lossless) or ``key_codes.i``/``value_codes.i``/``key_scales.i``/``value_scales.i`` (8-bit) -- and, with a
residual window, ``key_shadow.i``/``value_shadow.i`` (rows ``[:shadow_len]``).

Meta (JSON, checksummed with the rest): the session format version, the model identity
(``model_identity(model)``: config shapes, RoPE, dtype and a weights hash), the tokenizer's
vocabulary size, the cache format and per-layer lengths, the rendered history (each message with
its state -- live, gap, closed -- and the token ids fed for it), pending messages, the generation
prompt tail and the renderer options.

Under ``torch.distributed`` (initialized, world size > 1, e.g. a tensor-parallel model loaded with
``tp_plan="auto"``) ``save`` and ``load`` are collectives: every rank calls them with the same path.
Each rank's cache holds only its own KV heads, so each writes its part (``rank-<r>/``) and the top
manifest records the world size (see ``write_checkpoint``); a checkpoint loads only at the world
size it was saved at (``CheckpointError`` otherwise). See docs/distributed.md.

On load the saved history is re-rendered with the given tokenizer: if the template or tokenizer
produce other tokens than the saved ones, the checkpoint does not describe this tokenizer's
conversation and :class:`CheckpointError` says so.
"""

from __future__ import annotations

from kvcompact.agent.checkpoint import CheckpointError, model_identity, read_checkpoint, write_checkpoint
from kvcompact.agent.entries import Entry
from kvcompact.agent.messages import Message

__all__ = ["save_session", "load_session", "SESSION_FORMAT"]

SESSION_FORMAT = 1


def _message_dict(m: Message) -> dict:
    d = m.to_dict(include_id=True)
    d["metadata"] = m.metadata
    return d


def _world() -> tuple[int, int] | None:
    """``(rank, world_size)`` when ``torch.distributed`` runs with more than one process, else None."""
    import torch.distributed as dist

    if not dist.is_available():
        return None
    try:
        world = dist.get_world_size()
    except (ValueError, RuntimeError):  # no default process group: a plain single process
        return None
    return (dist.get_rank(), world) if world > 1 else None


def save_session(session, path) -> None:
    """Write ``session`` (its cache's ``export_state`` and its rendered history) to ``path``."""
    cache = session.cache
    tensors, layers = cache.export_state()
    meta = {
        "model": model_identity(session.model),
        "session": {
            "format_version": SESSION_FORMAT,
            "tokenizer_vocab": len(session.tokenizer),
            "cache": {"kv_dtype": cache.kv_dtype, "group_size": cache.group_size, "residual": cache.residual,
                      "layers": layers},
            "entries": [{"message": _message_dict(e.message), "ids": list(e.ids), "state": e.state}
                        for e in session._entries],
            "pending": [_message_dict(m) for m in session._pending],
            "gen_tail": list(session._gen_tail),
            "gen_prompt": session._gen_prompt,
            "renderer": dict(session._renderer_options),
            "rope_style": session._rope_style,
            "prefix_sha256": session._prefix.sha256 if session._prefix is not None else None,
        },
    }
    write_checkpoint(path, tensors, meta, world=_world())


def load_session(cls, path, model, tokenizer, **session_kwargs):
    """The session saved at ``path``, on ``model``/``tokenizer`` (``CheckpointError`` if it does not fit)."""
    from kvcompact.cache import KVCompactCache

    device = next(model.parameters()).device
    tensors, meta = read_checkpoint(path, expected_model_identity=model_identity(model), device=device,
                                   world=_world())
    info = meta.get("session")
    if not isinstance(info, dict) or info.get("format_version") != SESSION_FORMAT:
        raise CheckpointError(f"{path}: not a kvcompact Session checkpoint of format {SESSION_FORMAT}")
    if info["tokenizer_vocab"] != len(tokenizer):
        raise CheckpointError(f"{path}: saved with a tokenizer of {info['tokenizer_vocab']} tokens, "
                              f"this one has {len(tokenizer)}")
    c = info["cache"]
    cache = KVCompactCache(model.config, kv_dtype=c["kv_dtype"], group_size=c["group_size"], residual=c["residual"])
    opts = {**info["renderer"], **session_kwargs}
    s = cls(model, tokenizer, cache, rope_style=info.get("rope_style"), **opts)
    try:
        cache.import_state(tensors, c["layers"])
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path}: the saved cache does not fit this model's cache: {err}") from None
    entries = [Entry(Message.from_dict(e["message"]), list(e["ids"]), e["state"]) for e in info["entries"]]
    s._adopt(cache, entries, pending=[Message.from_dict(m) for m in info["pending"]], gen_tail=info["gen_tail"],
             gen_prompt=info["gen_prompt"])
    if cache.physical_length != len(s._cache_ids):
        raise CheckpointError(f"{path}: the cache holds {cache.physical_length} tokens, the messages "
                              f"{len(s._cache_ids)}")
    rendered = s.renderer.render_ids(s._history(), s._gen_prompt) if s._entries else []
    if rendered != s._virtual_ids():
        raise CheckpointError(
            f"{path}: this tokenizer/chat template renders the saved messages to other tokens than the saved "
            "ones (a different tokenizer or template?); the cached KV would not match the conversation")
    return s
