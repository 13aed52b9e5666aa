"""Run the scripted session twice in one process: dense baseline vs kvcompact.

Both runs are :class:`kvcompact.agent.Session` objects fed the same observations
(:mod:`kvcompact.demo.script`); only the cache and the context policy differ:

* ``DynamicCache``: transformers' default cache; every observation stays whole.
* ``kvcompact``: a ``KVCompactCache`` storing K/V in fp8 (e4m3, groups of 32), and
  after every step the message-level plan of :func:`kvcompact.agent.compact_messages`
  (observation budget, recent messages kept whole, a token budget) is applied to
  the cache in place: truncated tool outputs through ``Session.replace``, dropped
  ones through ``Session.drop``. Nothing is re-prefilled.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from kvcompact.demo.script import SYSTEM_PROMPT, TASK, build_steps


@dataclass
class DemoConfig:
    steps: int = 24
    max_new_tokens: int = 12
    kv_dtype: str = "fp8_e4m3"
    group_size: int = 32
    observation_budget: int = 96     # tokens a tool output keeps once it is no longer recent
    keep_recent: int = 4             # messages kept whole at the end (2 steps)
    token_budget: int = 1500         # context tokens the kvcompact run may hold


@dataclass
class StepRecord:
    step: int
    tool: str
    dense_context: int
    dense_kv_bytes: int
    compact_context: int
    compact_kv_bytes: int
    compact_dense_equiv_bytes: int
    prefill_avoided: int
    dense_answer: str
    compact_answer: str
    same_answer: bool
    seconds: float


@dataclass
class DemoResult:
    config: DemoConfig
    device: str
    model: str
    steps: list[StepRecord] = field(default_factory=list)
    dense_seconds: float = 0.0
    compact_seconds: float = 0.0
    tokens_reprefilled: int = 0
    edits: dict = field(default_factory=dict)

    def summary(self) -> dict:
        peak_dense = max(s.dense_kv_bytes for s in self.steps)
        peak_compact = max(s.compact_kv_bytes for s in self.steps)
        return {
            "steps": len(self.steps),
            "peak_kv_bytes_dense": peak_dense,
            "peak_kv_bytes_kvcompact": peak_compact,
            "peak_kv_ratio": peak_compact / peak_dense,
            "final_context_dense": self.steps[-1].dense_context,
            "final_context_kvcompact": self.steps[-1].compact_context,
            "tokens_reprefilled": self.tokens_reprefilled,
            "prefill_tokens_avoided": sum(s.prefill_avoided for s in self.steps),
            "same_answers": sum(s.same_answer for s in self.steps),
            "dense_seconds": round(self.dense_seconds, 2),
            "kvcompact_seconds": round(self.compact_seconds, 2),
            "edits": self.edits,
        }

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "device": self.device,
            "model": self.model,
            "summary": self.summary(),
            "steps": [asdict(s) for s in self.steps],
        }


def _model_name(model) -> str:
    path = str(getattr(model.config, "name_or_path", "") or "")
    if "SmolLM2-135M-Instruct" in path:
        return "SmolLM2-135M-Instruct (embedded)"
    return path or type(model).__name__


def dynamic_cache_bytes(cache) -> int:
    """Bytes held by a transformers DynamicCache (K and V of every layer)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    if not getattr(cache, "layers", None):  # transformers < 4.56 layout
        for t in list(getattr(cache, "key_cache", [])) + list(getattr(cache, "value_cache", [])):
            total += t.numel() * t.element_size()
    return total


def compact_kv_bytes(cache) -> tuple[int, int]:
    """(device bytes incl. the dequantization workspace, dense bytes of the held tokens)."""
    s = cache.stats()
    return s.device_bytes + getattr(s, "workspace_bytes", 0), s.dense_bytes


def apply_compaction(session, cfg: DemoConfig, tokenizer) -> tuple[int, int, int, int]:
    """Turn compact_messages' plan into in-place edits.

    Returns ``(replaced, dropped, tokens avoided, tokens re-prefilled)``. ``tokens
    avoided`` is what a message-level compactor without KV editing would re-prefill:
    everything from the first edited message to the end of the context. ``tokens
    re-prefilled`` is measured: tokens the edits fed to the model beyond the new
    (truncated) texts themselves.
    """
    from kvcompact.agent import compact_messages

    plan = compact_messages(
        session.messages, cfg.token_budget, keep_recent=cfg.keep_recent,
        observation_budget=cfg.observation_budget, tokenizer=tokenizer,
    ).plan
    if not plan.truncated and not plan.dropped:
        return 0, 0, 0, 0
    edited = [t.ref for t in plan.truncated] + [d.ref for d in plan.dropped]
    first_start = min(session.spans[ref][0] for ref in edited)
    avoided = len(session.token_ids) - first_start
    fed_before, new_text_tokens = session.fed_tokens, 0
    for t in plan.truncated:
        _, new_tokens = session.replace(t.ref, t.text)
        new_text_tokens += new_tokens
    for d in plan.dropped:
        session.drop(d.ref)
    reprefilled = session.fed_tokens - fed_before - new_text_tokens
    return len(plan.truncated), len(plan.dropped), max(avoided, 0), reprefilled


def run_demo(model, tokenizer, cfg: DemoConfig, on_step=None) -> DemoResult:
    """Runs both sessions step by step; ``on_step(record)`` is called after each step."""
    from transformers import DynamicCache

    from kvcompact import KVCompactCache
    from kvcompact.agent import Session

    steps = build_steps()[: cfg.steps]
    result = DemoResult(config=cfg, device=str(model.device), model=_model_name(model))
    dense = Session(model, tokenizer, cache=DynamicCache())
    compact = Session(
        model, tokenizer,
        cache=KVCompactCache(model.config, kv_dtype=cfg.kv_dtype, group_size=cfg.group_size),
    )
    for s in (dense, compact):
        s.add("system", SYSTEM_PROMPT)
        s.add("user", TASK)

    replaced = dropped = 0
    try:
        for i, step in enumerate(steps, 1):
            t0 = time.perf_counter()
            observation = f"$ {step.tool}\n{step.output}"
            dense.add("tool", observation)
            dense_answer = dense.generate(max_new_tokens=cfg.max_new_tokens, do_sample=False)
            t1 = time.perf_counter()

            compact.add("tool", observation)
            fed_before, held_before = compact.fed_tokens, len(compact.token_ids)
            compact_answer = compact.generate(max_new_tokens=cfg.max_new_tokens, do_sample=False)
            # Everything fed beyond what the context grew by was fed twice (a re-prefill).
            result.tokens_reprefilled += (compact.fed_tokens - fed_before) - (len(compact.token_ids) - held_before)
            r, d, avoided, reprefilled = apply_compaction(compact, cfg, tokenizer)
            result.tokens_reprefilled += reprefilled
            replaced += r
            dropped += d
            t2 = time.perf_counter()
            result.dense_seconds += t1 - t0
            result.compact_seconds += t2 - t1

            compact_bytes, compact_dense = compact_kv_bytes(compact.cache)
            record = StepRecord(
                step=i, tool=step.tool,
                dense_context=dense.cache.get_seq_length(),
                dense_kv_bytes=dynamic_cache_bytes(dense.cache),
                compact_context=compact.cache.get_seq_length(),
                compact_kv_bytes=compact_bytes,
                compact_dense_equiv_bytes=compact_dense,
                prefill_avoided=avoided,
                dense_answer=dense_answer, compact_answer=compact_answer,
                same_answer=dense_answer.strip() == compact_answer.strip(),
                seconds=t2 - t0,
            )
            result.steps.append(record)
            if on_step is not None:
                on_step(record)
    finally:
        compact.close()  # frees its buffers; the DynamicCache goes with its session
    result.edits = {"replaced": replaced, "dropped": dropped}
    return result
