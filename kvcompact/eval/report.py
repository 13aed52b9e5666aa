"""What an eval run measured: per question, per configuration, and the whole report (table, JSON, plot)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from kvcompact.eval.traces import KINDS

__all__ = ["QuestionResult", "ConfigResult", "EvalReport"]


@dataclass
class QuestionResult:
    """One question under one configuration."""

    trace: str
    question: str
    kind: str
    reply: str
    correct: bool
    reason: str = ""
    kl: float | None = None          # KL(reference || this config) of the first reply token, nats
    kl_exact: float | None = None    # KL(exact edited context || this config), when "reprefill" ran
    context_tokens: int = 0


@dataclass
class ConfigResult:
    """One configuration over every trace of the run.

    ``peak_kv_bytes``: the largest ``cache.stats().device_bytes`` of any trace;
    ``tokens_prefilled``: tokens fed for the context (events, edits, re-prefills);
    ``tokens_fed``: that plus questions and replies; ``seconds``: wall time of its replays.
    """

    name: str
    config: dict
    questions: list = field(default_factory=list)
    peak_kv_bytes: int = 0
    tokens_prefilled: int = 0
    tokens_fed: int = 0
    seconds: float = 0.0

    @property
    def correct(self) -> int:
        return sum(q.correct for q in self.questions)

    @property
    def total(self) -> int:
        return len(self.questions)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    @property
    def mean_kl(self) -> float | None:
        kls = [q.kl for q in self.questions if q.kl is not None]
        return sum(kls) / len(kls) if kls else None

    @property
    def mean_kl_exact(self) -> float | None:
        kls = [q.kl_exact for q in self.questions if q.kl_exact is not None]
        return sum(kls) / len(kls) if kls else None

    def by_kind(self) -> dict:
        """``kind -> (correct, total)`` for the kinds present."""
        out = {}
        for kind in KINDS:
            qs = [q for q in self.questions if q.kind == kind]
            if qs:
                out[kind] = (sum(q.correct for q in qs), len(qs))
        return out

    def to_dict(self) -> dict:
        return {"name": self.name, "config": self.config, "correct": self.correct, "total": self.total,
                "accuracy": self.accuracy, "mean_kl": self.mean_kl,
                "mean_kl_exact": self.mean_kl_exact, "by_kind": self.by_kind(),
                "peak_kv_bytes": self.peak_kv_bytes, "tokens_prefilled": self.tokens_prefilled,
                "tokens_fed": self.tokens_fed, "seconds": self.seconds,
                "questions": [asdict(q) for q in self.questions]}

    @classmethod
    def from_dict(cls, d: dict) -> "ConfigResult":
        return cls(name=d["name"], config=dict(d["config"]), questions=[QuestionResult(**q) for q in d["questions"]],
                   peak_kv_bytes=d["peak_kv_bytes"], tokens_prefilled=d["tokens_prefilled"],
                   tokens_fed=d["tokens_fed"], seconds=d["seconds"])


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


@dataclass
class EvalReport:
    """Every configuration's results on the same traces; ``reference`` names the KL reference."""

    model: str
    traces: list
    configs: list
    reference: str | None = None
    settings: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> ConfigResult:
        for c in self.configs:
            if c.name == name:
                return c
        raise KeyError(f"no configuration {name!r} in this report; it has {', '.join(c.name for c in self.configs)}")

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps({"model": self.model, "traces": self.traces, "reference": self.reference,
                           "settings": self.settings, "configs": [c.to_dict() for c in self.configs]},
                          indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "EvalReport":
        d = json.loads(text)
        return cls(model=d["model"], traces=list(d["traces"]), reference=d["reference"],
                   settings=dict(d["settings"]), configs=[ConfigResult.from_dict(c) for c in d["configs"]])

    def plot(self, path):
        """Accuracy against peak KV memory, one labelled point per configuration, as a PNG at ``path``.

        Needs matplotlib (``pip install "kvcompact[demo]"``); see :func:`kvcompact.eval.plot.plot_report`.
        Returns the path written.
        """
        from kvcompact.eval.plot import plot_report

        return plot_report(self, path)

    def table(self) -> str:
        """A plain-text table, one row per configuration.

        "KL dense" is the mean KL from the reference (every message whole); "KL exact" the mean KL
        from the edited conversation prefilled afresh (``reprefill``), when it ran.
        """
        kinds = [k for k in KINDS if any(k in c.by_kind() for c in self.configs)]
        head = ["config", "accuracy"] + kinds + ["KL dense", "KL exact", "peak KV MiB", "prefilled", "fed", "seconds"]

        def kl_cell(kl) -> str:
            return "-" if kl is None or math.isnan(kl) else f"{kl:.4f}"

        rows = []
        for c in self.configs:
            bk = c.by_kind()
            rows.append([c.name, f"{c.correct}/{c.total} ({c.accuracy:.0%})"]
                        + [f"{bk[k][0]}/{bk[k][1]}" if k in bk else "-" for k in kinds]
                        + [kl_cell(c.mean_kl), kl_cell(c.mean_kl_exact), _mib(c.peak_kv_bytes),
                           f"{c.tokens_prefilled:,}", f"{c.tokens_fed:,}", f"{c.seconds:.1f}"])
        widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]

        def line(cells) -> str:  # names left-aligned, numbers right-aligned
            return "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)
                             for i, (v, w) in enumerate(zip(cells, widths)))

        return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])
