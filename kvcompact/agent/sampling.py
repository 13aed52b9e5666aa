"""Token picking for :meth:`Session.generate`: greedy or temperature / top-k / top-p sampling, and
the text side of decoding (stop strings, what a streamed reply may show yet)."""

from __future__ import annotations

import torch

__all__ = ["pick_token", "eos_ids", "stop_strings", "find_stop", "settled_length"]


def pick_token(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> int:
    """The next token from ``logits`` ``[vocab]``: the argmax, or a sample.

    ``temperature`` divides the logits (floored at 1e-6); ``top_k`` keeps the ``k`` best;
    ``top_p`` keeps the smallest set of most probable tokens whose mass reaches ``p``.
    """
    if not do_sample:
        return int(torch.argmax(logits))
    scores = logits.float() / max(temperature, 1e-6)
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, -1)
    if top_p is not None and top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        cut = torch.cumsum(sp, -1) - sp > top_p
        sp = sp.masked_fill(cut, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, si, sp)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def eos_ids(model, tokenizer, eos_token_id=None) -> set:
    """Token ids that end a reply: ``eos_token_id`` (int or list), else the model's generation
    config's, else the tokenizer's; plus ChatML's ``<|im_end|>`` when the vocabulary has it."""
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = tokenizer.eos_token_id
    ids = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])
    if "<|im_end|>" in tokenizer.get_vocab():
        ids.add(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return {i for i in ids if i is not None}


# ---------------------------------------------------------------------- stop strings, streaming


def stop_strings(stop) -> tuple:
    """``stop`` (None, a str, or a sequence of str) as a tuple of non-empty strings.

    Raises ``ValueError`` naming ``stop`` for anything else (an empty string would stop at once).
    """
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if isinstance(items, (bytes, dict)) or not isinstance(items, (list, tuple)):
        raise ValueError(f"stop must be None, a str or a list of str; got {type(stop).__name__}")
    for k, s in enumerate(items):
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop[{k}] must be a non-empty str; got {s!r}")
    return tuple(items)


def find_stop(text: str, stops: tuple) -> int | None:
    """Index where the earliest of ``stops`` starts in ``text`` (None when none occurs)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def settled_length(text: str, stops: tuple) -> int:
    """How much of a partly decoded reply can be shown for good.

    Held back: a trailing incomplete UTF-8 character (the tokenizer decodes it as U+FFFD until its
    last byte arrives) and the longest tail of ``text`` that begins one of ``stops`` (the next
    tokens may complete the stop string, and the reply is cut before it).
    """
    n = len(text.rstrip("\ufffd"))
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, n), hold, -1):
            if text.endswith(s[:k], 0, n):
                hold = k
                break
    return n - hold
