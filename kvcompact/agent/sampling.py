"""Token picking for :meth:`Session.generate`: greedy or temperature / top-k / top-p sampling."""

from __future__ import annotations

import torch

__all__ = ["pick_token", "eos_ids"]


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
