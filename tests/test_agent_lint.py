"""Static checks over kvcompact/agent/*.py: the agent layer reaches the cache only through its
public API, and hands the cache to the model under the version's argument name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kvcompact.agent

AGENT = Path(kvcompact.agent.__file__).parent
FILES = sorted(AGENT.glob("*.py"))

# Storage and layer internals: no agent module may name these, on any object.
INTERNALS = {"storage", "set_lengths", "token_tensors", "_tail_contiguous", "_tail", "_shapes", "_logical",
             "set_buffers", "buffers", "valid_rows", "load_rows", "drop_rows", "move_rows", "rotate_keys",
             "copy_rows", "write_rows", "open_splice", "close_splice", "snapshot", "physical_len",
             "logical_len", "lazy_initialization", "is_initialized", "layers", "_store_args", "_used_layers",
             "_attention_layers"}
# Identifiers that name a cache, a layer or a store (``cache``, ``self.cache``, ``layer``, ``store``...).
CACHE_WORDS = ("cache", "layer", "stor")


def _base_name(node: ast.AST) -> str | None:
    """The identifier an expression ends in: ``s.cache`` -> ``cache``, ``ref()`` -> ``ref``."""
    while isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Subscript):
        return _base_name(node.value)
    return None


def _cache_like(node: ast.AST) -> bool:
    name = (_base_name(node) or "").lower()
    return any(w in name for w in CACHE_WORDS)


def violations(source: str, filename: str = "<src>") -> list[str]:
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute):
            if node.attr in INTERNALS:
                out.append(f"{where}: .{node.attr} is a cache/layer internal")
            elif node.attr.startswith("_") and not node.attr.startswith("__") and _cache_like(node.value):
                out.append(f"{where}: private attribute .{node.attr} of a cache/layer object")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("setattr", "getattr", "delattr") and node.args and _cache_like(node.args[0]):
            out.append(f"{where}: {node.func.id}() on a cache/layer object")
        elif isinstance(node, ast.keyword) and node.arg == "past_key_values":
            out.append(f"{where}: past_key_values= (use **compat.cache_kwargs(cache))")
    return out


def test_the_lint_catches_what_it_should():
    bad = """
def f(session, cache, layer):
    cache.layers[0].storage.keys
    layer.set_lengths(physical=1, logical=1, tail_contiguous=1)
    session.cache._padded = True
    setattr(layer.storage, "keys", None)
    getattr(session.cache, "_evictor")
    model(input_ids=x, past_key_values=cache)
"""
    found = violations(bad)
    for what in ("storage", "set_lengths", "layers", "_padded", "setattr", "getattr", "past_key_values"):
        assert any(what in v for v in found), (what, found)
    ok = """
def f(self, cache):
    self._entries.append(1)
    self.cache.drop_span(0, 1)
    cache.export_state()
    self._prefix.session()
    model(input_ids=x, **compat.cache_kwargs(self.cache))
"""
    assert violations(ok) == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_agent_code_uses_only_the_cache_api(path):
    """The cache owns its edits: span edits, checkpoints and parking go through KVCompactCache's
    public methods (drop_span, splice, export_state, storage_tensors ...), never its internals."""
    assert violations(path.read_text(), path.name) == []


def test_the_lint_sees_every_agent_module():
    names = {p.name for p in FILES}
    assert {"session.py", "edits.py", "session_io.py", "park.py", "spawn.py", "prefix.py"} <= names
    assert "kvedit.py" not in names  # the cache's own edit API replaced it
