"""Incremental rendering drives the real model: feeding only the increments (retractions applied with
``cache.crop``) gives the same cache contents and next-token logits as prefilling the full render."""

from __future__ import annotations

import pytest
import torch

from agent_fixtures import smollm2_model
from kvcompact.agent import Message, TemplateRenderer
from kvcompact.cache import compat

pytestmark = pytest.mark.slow


def test_increments_match_full_prefill_on_smollm2():
    from transformers import DynamicCache

    model, tok = smollm2_model()
    r = TemplateRenderer(tok)
    cache = DynamicCache()
    fed: list = []

    def feed(ids):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), use_cache=True, **compat.cache_kwargs(cache))
        fed.extend(ids)
        return out.logits[0, -1]

    def apply(inc):
        if inc.retract_tokens:
            cache.crop(-inc.retract_tokens)  # negative: remove n tokens (every transformers >= 4.56)
            del fed[len(fed) - inc.retract_tokens:]
        return feed(inc.token_ids)

    msgs = [Message("system", "You are a terse coding agent."), Message("user", "What is in src/?")]
    apply(r.render_increment(msgs, 0, add_generation_prompt=True))
    # The agent calls a tool instead of answering: the generation prompt is taken back.
    msgs.append(Message("tool", "main.py\nutil.py\n\n", name="ls"))
    inc = r.render_increment(msgs, 2, add_generation_prompt=True, previous_generation_prompt=True, previous_ids=fed)
    assert inc.retract_tokens == 3  # "assistant\n" of the unused header
    logits = apply(inc)
    # Greedy reply, generated into the cache token by token.
    reply = []
    for _ in range(8):
        nxt = int(logits.argmax())
        reply.append(nxt)
        if nxt == tok.eos_token_id:
            break
        logits = feed([nxt])
    msgs.append(Message("assistant", tok.decode(reply, skip_special_tokens=True)))
    msgs.append(Message("user", "\n\nThanks. Which one is the entry point?"))
    logits = apply(r.render_increment(msgs, 3, add_generation_prompt=True, previous_ids=fed))

    full = r.render_ids(msgs, add_generation_prompt=True)
    assert fed == full
    assert cache.get_seq_length() == len(full)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([full])).logits[0, -1]
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
