"""The agent layer: message-level decisions turned into KV-cache edits (see docs/agent.md).

- :mod:`~kvcompact.agent.messages`: :class:`Message` (role, content, stable id) and id generators.
- :mod:`~kvcompact.agent.template`: :class:`TemplateRenderer`, the tokens to append (and to take
  back) when messages arrive, equal to tokenizing the full chat-template render.
- :mod:`~kvcompact.agent.tracker`: :class:`MemoryTracker`, tokens and KV bytes per step.
- :mod:`~kvcompact.agent.compaction`: :func:`compact_messages` and its :class:`CompactionPlan`.
- :mod:`~kvcompact.agent.structured`: :func:`structure_output` / :func:`structured_tool`, a tool's
  raw output shaped to the fields asked for under a token budget, the rest kept in an
  :class:`OutputStore` by handle (:func:`fetch_output`).
- :mod:`~kvcompact.agent.checkpoint`: atomic, checksummed checkpoint directories.
- :mod:`~kvcompact.agent.session`: :class:`Session`, messages as editable cache spans (state, feeding,
  generation); its other jobs, one module each: :mod:`~kvcompact.agent.sampling` (token picking),
  :mod:`~kvcompact.agent.edits` (drop, replace), :mod:`~kvcompact.agent.sync` (sync a full message list), :mod:`~kvcompact.agent.spawn` (sub-agents),
  :mod:`~kvcompact.agent.park` (parking), :mod:`~kvcompact.agent.session_io` (save/load),
  :mod:`~kvcompact.agent.prefix` (:class:`PrefixCache`); :mod:`~kvcompact.agent.entries` holds the
  per-message record they share. The cache edits themselves are the cache's own API
  (``KVCompactCache.drop_span``, ``splice``, ``export_state``...).

Heavy dependencies (tiktoken, matplotlib, safetensors, transformers) are imported on first use.
"""

from kvcompact.agent.messages import ROLES, IdGenerator, Message, as_message, message_ref, new_message_id
from kvcompact.agent.template import (Increment, RenderState, TemplateError, TemplateNotPrefixStable,
                                      TemplateRenderer)
from kvcompact.agent.checkpoint import CheckpointError, model_identity, read_checkpoint, write_checkpoint
from kvcompact.agent.compaction import (CompactedMessages, CompactionPlan, Drop, Truncation, apply_plan,
                                        compact_messages, plan_compaction)
from kvcompact.agent.structured import (OutputStore, StructuredOutput, fetch_output, structure_output,
                                        structured_tool)
from kvcompact.agent.tracker import ContextGrowthWarning, MemoryTracker, StepRecord
from kvcompact.agent.session import (PrefixCache, PrefixChangedError, Session, SessionError, SpawnRecord,
                                     prefix_sha256)
from kvcompact.agent.sync import SyncResult

__all__ = ["ROLES", "IdGenerator", "Message", "as_message", "message_ref", "new_message_id",
           "Increment", "RenderState", "TemplateError", "TemplateNotPrefixStable", "TemplateRenderer",
           "ContextGrowthWarning", "MemoryTracker", "StepRecord",
           "CompactedMessages", "CompactionPlan", "Drop", "Truncation", "apply_plan", "compact_messages",
           "plan_compaction",
           "OutputStore", "StructuredOutput", "fetch_output", "structure_output", "structured_tool",
           "CheckpointError", "model_identity", "read_checkpoint", "write_checkpoint",
           "Session", "SessionError", "SpawnRecord", "PrefixCache", "PrefixChangedError", "prefix_sha256",
           "SyncResult"]
