"""Deterministic tool outputs of realistic size, with one fact planted where the trace says.

A trace's tool output can be literal text or ``{"generator": NAME, "seed": N, ...}``; the
generator builds the output from ``random.Random(seed)`` alone, so the data files stay small and
every run (and every configuration) sees byte-identical text. Each generator plants the trace's
fact (a log line, a record, a file, a row) at the relative position ``at`` (0 = first line,
1 = last), so a trace controls whether a truncation that keeps head and tail removes it.

Generators (parameters beyond ``seed``; every one is optional except what is planted):

* ``log``: application log lines. ``lines`` (int, 60), ``plant`` (list of
  ``{"line": str, "at": float}``, the text after the timestamp), ``service`` (str).
* ``json_api``: a JSON API response, a list of records of one ``schema`` (``"services"``,
  ``"orders"``, ``"users"``). ``items`` (int, 20), ``plant`` (list of ``{"record": {...},
  "at": float}``: fields override a generated record's).
* ``file_listing``: ``ls -la``-style lines of a source tree. ``files`` (int, 50),
  ``plant`` (list of ``{"path": str, "size": int, "at": float}``), ``root`` (str).
* ``csv``: a CSV table. ``rows`` (int, 40), ``columns`` (list of str, a schema's default),
  ``schema`` (``"sales"`` or ``"metrics"``), ``plant`` (list of ``{"row": {...}, "at": float}``).

Example
-------
>>> text = generate({"generator": "log", "seed": 3, "lines": 5,
...                  "plant": [{"line": "ERROR db: disk full on /dev/sdb1", "at": 0.5}]})
>>> "disk full on /dev/sdb1" in text
True
>>> text == generate({"generator": "log", "seed": 3, "lines": 5,
...                   "plant": [{"line": "ERROR db: disk full on /dev/sdb1", "at": 0.5}]})
True
"""

from __future__ import annotations

import json
import random
from typing import Any, Callable, Mapping

__all__ = ["generate", "GENERATORS", "GeneratorError"]


class GeneratorError(ValueError):
    """A generator spec is malformed (unknown generator, a parameter of the wrong type)."""


_WORDS = ["cache", "queue", "worker", "session", "index", "shard", "batch", "token", "ledger", "report",
          "invoice", "profile", "upload", "export", "billing", "search", "notify", "audit", "gateway", "config"]
_NAMES = ["alice", "bruno", "chen", "dana", "elif", "farid", "greta", "hiro", "ines", "jonas", "kemal",
          "lena", "marco", "nadia", "oskar", "priya", "quinn", "rosa", "sven", "tara"]
_CITIES = ["Lisbon", "Oslo", "Austin", "Osaka", "Lyon", "Porto", "Denver", "Dublin", "Turin", "Leeds"]
_LEVELS = ["INFO"] * 8 + ["DEBUG"] * 3 + ["WARN"]


def _int(spec: Mapping, key: str, default: int, lo: int = 1, hi: int = 10_000) -> int:
    value = spec.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise GeneratorError(f"generator {spec.get('generator')!r}: {key} must be an int in [{lo}, {hi}]; "
                             f"got {value!r}")
    return value


def _plants(spec: Mapping, required: tuple) -> list:
    plants = spec.get("plant", [])
    if not isinstance(plants, list):
        raise GeneratorError(f"generator {spec.get('generator')!r}: plant must be a list; got "
                             f"{type(plants).__name__}")
    for k, p in enumerate(plants):
        if not isinstance(p, Mapping):
            raise GeneratorError(f"generator {spec.get('generator')!r}: plant[{k}] must be an object")
        for key in required:
            if key not in p:
                raise GeneratorError(f"generator {spec.get('generator')!r}: plant[{k}] needs {key!r}")
        at = p.get("at", 0.5)
        if not isinstance(at, (int, float)) or isinstance(at, bool) or not 0.0 <= at <= 1.0:
            raise GeneratorError(f"generator {spec.get('generator')!r}: plant[{k}].at must be a number in "
                                 f"[0, 1]; got {at!r}")
    return plants


def _insert(rows: list, plants: list, make: Callable[[Mapping], Any]) -> list:
    """``rows`` with one made row per plant at its relative position (stable for equal ``at``)."""
    out = list(rows)
    for p in sorted(plants, key=lambda p: p.get("at", 0.5)):
        out.insert(round(p.get("at", 0.5) * len(out)), make(p))
    return out


def _clock(rng: random.Random, n: int) -> list:
    t = rng.randint(0, 3600 * 6)
    stamps = []
    for _ in range(n):
        t += rng.randint(0, 9)
        stamps.append(f"2024-05-14T{8 + t // 3600:02d}:{t // 60 % 60:02d}:{t % 60:02d}.{rng.randint(0, 999):03d}Z")
    return stamps


def log(spec: Mapping) -> str:
    rng = random.Random(spec.get("seed", 0))
    n = _int(spec, "lines", 60)
    plants = _plants(spec, ("line",))
    service = str(spec.get("service", "app"))
    lines = []
    for _ in range(n):
        level, word, other = rng.choice(_LEVELS), rng.choice(_WORDS), rng.choice(_WORDS)
        template = rng.randrange(6)
        if template == 0:
            text = f"{word}: processed batch {rng.randint(1000, 9999)} in {rng.randint(3, 900)}ms"
        elif template == 1:
            text = f"{word}: GET /api/v2/{other}/{rng.randint(1, 99999)} 200 {rng.randint(1, 300)}ms"
        elif template == 2:
            text = f"{word}: cache hit ratio {rng.randint(60, 99)}.{rng.randint(0, 9)}% ({rng.randint(1, 9)} shards)"
        elif template == 3:
            text = f"{word}: user {rng.choice(_NAMES)} opened {other} #{rng.randint(100, 9999)}"
        elif template == 4:
            text = f"{word}: retry {rng.randint(1, 3)}/3 for {other} job {rng.randint(10000, 99999)}"
        else:
            text = f"{word}: heartbeat ok, queue depth {rng.randint(0, 400)}, lag {rng.randint(0, 80)}ms"
        lines.append(f"{level:5s} {service}.{text}")
    lines = _insert(lines, plants, lambda p: str(p["line"]))
    stamps = _clock(rng, len(lines))
    return "\n".join(f"{s} {line}" for s, line in zip(stamps, lines))


def _service(rng: random.Random, i: int) -> dict:
    return {"name": f"{rng.choice(_WORDS)}-{rng.choice(['api', 'worker', 'cron', 'proxy'])}-{i}",
            "port": rng.randint(3000, 9999), "replicas": rng.randint(1, 12),
            "owner": rng.choice(_NAMES), "region": rng.choice(["eu-west-1", "us-east-2", "ap-south-1"]),
            "version": f"{rng.randint(1, 4)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}",
            "healthy": rng.random() > 0.1}


def _order(rng: random.Random, i: int) -> dict:
    return {"order_id": f"ORD-{rng.randint(10000, 99999)}", "customer": rng.choice(_NAMES).title(),
            "city": rng.choice(_CITIES), "items": rng.randint(1, 9),
            "total": f"{rng.randint(5, 900)}.{rng.randint(0, 99):02d}",
            "status": rng.choice(["shipped", "pending", "delivered", "refunded"])}


def _user(rng: random.Random, i: int) -> dict:
    name = rng.choice(_NAMES)
    return {"id": rng.randint(1000, 99999), "login": f"{name}{rng.randint(1, 99)}",
            "email": f"{name}@example.org", "role": rng.choice(["viewer", "editor", "admin", "billing"]),
            "last_login": f"2024-0{rng.randint(1, 5)}-{rng.randint(10, 28)}", "mfa": rng.random() > 0.3}


_SCHEMAS = {"services": ("services", _service), "orders": ("orders", _order), "users": ("users", _user)}


def json_api(spec: Mapping) -> str:
    rng = random.Random(spec.get("seed", 0))
    n = _int(spec, "items", 20)
    schema = spec.get("schema", "services")
    if schema not in _SCHEMAS:
        raise GeneratorError(f"generator 'json_api': schema must be one of {', '.join(_SCHEMAS)}; got {schema!r}")
    key, make = _SCHEMAS[schema]
    plants = _plants(spec, ("record",))
    records = [make(rng, i) for i in range(n)]
    records = _insert(records, plants, lambda p: {**make(rng, n), **dict(p["record"])})
    body = {key: records, "count": len(records), "next_page": None}
    return json.dumps(body, indent=1)


def file_listing(spec: Mapping) -> str:
    rng = random.Random(spec.get("seed", 0))
    n = _int(spec, "files", 50)
    root = str(spec.get("root", "."))
    plants = _plants(spec, ("path",))
    dirs = ["src", "src/core", "src/api", "tests", "docs", "scripts", "config", "src/utils"]
    exts = [".py", ".py", ".py", ".md", ".json", ".yaml", ".txt", ".sh"]

    def row(path: str, size: int) -> str:
        month, day = rng.choice(["Mar", "Apr", "May"]), rng.randint(1, 28)
        return f"-rw-r--r-- 1 {rng.choice(_NAMES):6s} staff {size:8d} {month} {day:2d} {rng.randint(8, 19):02d}:" \
               f"{rng.randint(0, 59):02d} {root}/{path}"

    rows = [row(f"{rng.choice(dirs)}/{rng.choice(_WORDS)}_{rng.choice(_WORDS)}{rng.choice(exts)}",
                rng.randint(120, 48000)) for _ in range(n)]
    rows = _insert(rows, plants, lambda p: row(str(p["path"]), int(p.get("size", 1024))))
    return f"total {len(rows)}\n" + "\n".join(rows)


_CSV = {"sales": ["date", "region", "product", "units", "revenue"],
        "metrics": ["host", "cpu_pct", "mem_mb", "disk_pct", "uptime_h"]}


def csv(spec: Mapping) -> str:
    rng = random.Random(spec.get("seed", 0))
    n = _int(spec, "rows", 40)
    schema = spec.get("schema", "sales")
    if schema not in _CSV:
        raise GeneratorError(f"generator 'csv': schema must be one of {', '.join(_CSV)}; got {schema!r}")
    columns = _CSV[schema]
    plants = _plants(spec, ("row",))

    def make(fixed: Mapping) -> str:
        if schema == "sales":
            values = {"date": f"2024-04-{rng.randint(1, 30):02d}", "region": rng.choice(_CITIES),
                      "product": f"{rng.choice(_WORDS)}-{rng.randint(1, 40)}", "units": rng.randint(1, 500),
                      "revenue": f"{rng.randint(10, 20000)}.{rng.randint(0, 99):02d}"}
        else:
            values = {"host": f"node-{rng.randint(1, 99):02d}", "cpu_pct": rng.randint(2, 97),
                      "mem_mb": rng.randint(512, 64000), "disk_pct": rng.randint(5, 95),
                      "uptime_h": rng.randint(1, 4000)}
        values.update(fixed)
        return ",".join(str(values[c]) for c in columns)

    rows = [make({}) for _ in range(n)]
    rows = _insert(rows, plants, lambda p: make(dict(p["row"])))
    return ",".join(columns) + "\n" + "\n".join(rows)


GENERATORS: dict[str, Callable[[Mapping], str]] = {
    "log": log, "json_api": json_api, "file_listing": file_listing, "csv": csv}


def generate(spec: Mapping) -> str:
    """The text of a generator spec ``{"generator": NAME, "seed": int, ...}`` (see the module doc)."""
    if not isinstance(spec, Mapping):
        raise GeneratorError(f"a generator spec must be an object; got {type(spec).__name__}")
    name = spec.get("generator")
    if name not in GENERATORS:
        raise GeneratorError(f"unknown generator {name!r}; expected one of {', '.join(GENERATORS)}")
    seed = spec.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise GeneratorError(f"generator {name!r}: seed must be an int; got {seed!r}")
    return GENERATORS[name](spec)
