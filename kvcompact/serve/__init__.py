"""Serving layer: many live agent sessions on one model (the OpenAI-compatible server builds on it).

:class:`SessionManager` routes each chat request to the session that holds its context, reusing
that session's KV, and parks idle sessions under a device-memory budget. See docs/serve.md.
"""

from kvcompact.serve.manager import ChatResult, ManagerStats, SessionManager

__all__ = ["ChatResult", "ManagerStats", "SessionManager"]
