"""The agent layer: messages, incremental templates, tracking, compaction, checkpoints."""

from kvcompact.agent.messages import ROLES, IdGenerator, Message, as_message, new_message_id
from kvcompact.agent.template import (Increment, RenderState, TemplateError, TemplateNotPrefixStable,
                                      TemplateRenderer)
from kvcompact.agent.checkpoint import CheckpointError, model_identity, read_checkpoint, write_checkpoint
from kvcompact.agent.compaction import (CompactedMessages, CompactionPlan, Drop, Truncation, apply_plan,
                                        compact_messages, plan_compaction)
from kvcompact.agent.tracker import ContextGrowthWarning, MemoryTracker, StepRecord

__all__ = ["ROLES", "IdGenerator", "Message", "as_message", "new_message_id",
           "Increment", "RenderState", "TemplateError", "TemplateNotPrefixStable", "TemplateRenderer",
           "ContextGrowthWarning", "MemoryTracker", "StepRecord",
           "CompactedMessages", "CompactionPlan", "Drop", "Truncation", "apply_plan", "compact_messages",
           "plan_compaction",
           "CheckpointError", "model_identity", "read_checkpoint", "write_checkpoint"]
