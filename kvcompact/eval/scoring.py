"""The eval's scoring rule: normalise, then match an accepted answer; forbid stale values; check instructions.

Rule, in order (every step is documented so a score can be checked by hand):

1. **Normalise** reply and answers alike (:func:`normalise`): Unicode NFKC, lower case; numbers
   lose thousands separators, a currency sign and trailing fractional zeros (``"$4,096.50"`` ->
   ``"4096.5"``, ``"12.00"`` -> ``"12"``; versions such as ``2.4.0`` and ids such as ``007`` are
   left alone); every other character that is not a letter or digit becomes a space (so
   ``src/app.py`` -> ``src app py``); the articles *a*, *an*, *the* are removed; whitespace collapses.
2. **Match**: ``"exact"`` -- the normalised reply equals a normalised accepted answer;
   ``"contains"`` -- a normalised accepted answer occurs in the normalised reply as whole words
   (``"9443"`` is in ``"port is 9443"``, not in ``"94430"``). A question with no accepted answers
   (an instruction-only question) passes this step.
3. **Forbidden**: the reply fails if a normalised forbidden string occurs in it as whole words
   (a stale value the context later corrected; checked even when an accepted answer matched,
   so "9443, or maybe 8443" fails when 8443 is forbidden).
4. **Checks**: named predicates on the raw reply (:data:`CHECKS`), for instructions given early
   in a trace (``uppercase``, ``ends_with`` a token, ...). Every check must hold.

Example
-------
>>> score("The payments API listens on port 9,443.", Rule(answers=("9443",))).correct
True
>>> score("Port 8443, sorry: 9443", Rule(answers=("9443",), forbidden=("8443",))).correct
False
>>> score("DONE OPS-17", Rule(checks=(Check("uppercase"), Check("ends_with", "OPS-17")))).correct
True
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["normalise", "Rule", "Check", "Score", "score", "CHECKS", "MATCHES"]

MATCHES = ("exact", "contains")

# A number not glued to a word or to another number part: "4,096", "$12.50", "0.5"; the lookarounds
# keep versions ("2.4.0"), dotted ids and words with digits ("v2", "node-07a") out.
_NUMBER = re.compile(r"(?<![\w.,])[$€£]?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\w]|[.,]\d)")
_ARTICLES = {"a", "an", "the"}


def _canonical_number(m: re.Match) -> str:
    whole = m.group(1).replace(",", "")
    frac = (m.group(2) or "").rstrip("0")
    return whole + (frac if frac not in ("", ".") else "")


def normalise(text: str) -> str:
    """The normalised form of ``text`` used by every comparison (see the module docstring, step 1).

    >>> normalise("The total is $4,096.50!")
    'total is 4096 5'
    >>> normalise("Version 2.4.0 in src/App.py")
    'version 2 4 0 in src app py'
    """
    if not isinstance(text, str):
        raise TypeError(f"normalise: text must be a str; got {type(text).__name__}")
    text = unicodedata.normalize("NFKC", text).lower()
    text = _NUMBER.sub(_canonical_number, text)
    words = re.sub(r"[^\w]+|_", " ", text).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def _contains_words(haystack: str, needle: str) -> bool:
    return bool(needle) and f" {needle} " in f" {haystack} "


# ---------------------------------------------------------------------- instruction checks


def _letters(reply: str) -> str:
    return "".join(ch for ch in reply if ch.isalpha())


def _uppercase(reply: str, arg: str | None) -> bool:
    letters = _letters(reply)
    return bool(letters) and letters == letters.upper()


def _lowercase(reply: str, arg: str | None) -> bool:
    letters = _letters(reply)
    return bool(letters) and letters == letters.lower()


def _strip_end(reply: str) -> str:
    return reply.strip().rstrip(".!?;:,)\"' ").strip()


def _ends_with(reply: str, arg: str | None) -> bool:
    return _strip_end(reply).lower().endswith(str(arg).lower())


def _starts_with(reply: str, arg: str | None) -> bool:
    return reply.strip().lstrip("\"'(").lower().startswith(str(arg).lower())


def _mentions(reply: str, arg: str | None) -> bool:
    return _contains_words(normalise(reply), normalise(str(arg)))


def _max_words(reply: str, arg: str | None) -> bool:
    return len(reply.split()) <= int(arg)


#: name -> (predicate(reply, arg) -> bool, whether it needs an argument, what it means)
CHECKS: dict[str, tuple[Callable[[str, str | None], bool], bool, str]] = {
    "uppercase": (_uppercase, False, "every letter of the reply is upper case (at least one letter)"),
    "lowercase": (_lowercase, False, "every letter of the reply is lower case (at least one letter)"),
    "ends_with": (_ends_with, True, "the reply, without trailing punctuation, ends with arg (any case)"),
    "starts_with": (_starts_with, True, "the reply, without leading quotes, starts with arg (any case)"),
    "mentions": (_mentions, True, "arg occurs in the reply as whole words after normalisation"),
    "max_words": (_max_words, True, "the reply has at most arg whitespace-separated words"),
}


@dataclass(frozen=True)
class Check:
    """A named instruction predicate (a key of :data:`CHECKS`) with its argument, if it takes one."""

    name: str
    arg: str | None = None

    def __post_init__(self):
        if self.name not in CHECKS:
            raise ValueError(f"Check.name must be one of {', '.join(CHECKS)}; got {self.name!r}")
        needs_arg = CHECKS[self.name][1]
        if needs_arg and (self.arg is None or str(self.arg) == ""):
            raise ValueError(f"Check {self.name!r} needs an arg ({CHECKS[self.name][2]})")
        if self.name == "max_words" and not str(self.arg).isdigit():
            raise ValueError(f"Check 'max_words' needs an integer arg; got {self.arg!r}")
        if not needs_arg and self.arg is not None:
            raise ValueError(f"Check {self.name!r} takes no arg; got {self.arg!r}")

    def __call__(self, reply: str) -> bool:
        return bool(CHECKS[self.name][0](reply, self.arg))

    def __str__(self) -> str:
        return self.name if self.arg is None else f"{self.name}({self.arg})"


@dataclass(frozen=True)
class Rule:
    """How one question's reply is scored (see the module docstring for the steps).

    Parameters
    ----------
    answers : tuple of str
        Accepted answers; any one matching is enough. Empty: only ``checks`` decide.
    match : {"contains", "exact"}
    forbidden : tuple of str
        Stale values that must not appear.
    checks : tuple of Check
        Instruction predicates that must all hold.
    """

    answers: tuple = ()
    match: str = "contains"
    forbidden: tuple = ()
    checks: tuple = field(default_factory=tuple)

    def __post_init__(self):
        if self.match not in MATCHES:
            raise ValueError(f"Rule.match must be one of {', '.join(MATCHES)}; got {self.match!r}")
        for name in ("answers", "forbidden"):
            values = getattr(self, name)
            if isinstance(values, str) or not all(isinstance(v, str) and normalise(v) for v in values):
                raise ValueError(f"Rule.{name} must be a list of non-empty strings (non-empty after "
                                 f"normalisation); got {values!r}")
        if not all(isinstance(c, Check) for c in self.checks):
            raise ValueError(f"Rule.checks must be Check objects; got {self.checks!r}")
        if not self.answers and not self.checks:
            raise ValueError("a Rule needs accepted answers, checks, or both")


@dataclass(frozen=True)
class Score:
    """The outcome for one reply: ``correct`` and why (``reason`` is empty when correct)."""

    correct: bool
    matched: str | None = None
    forbidden_hit: str | None = None
    failed_checks: tuple = ()
    reason: str = ""


def score(reply: str, rule: Rule) -> Score:
    """Score ``reply`` by ``rule`` (the module docstring's steps 1-4)."""
    if not isinstance(reply, str):
        raise TypeError(f"score: reply must be a str; got {type(reply).__name__}")
    norm = normalise(reply)
    matched = None
    for ans in rule.answers:
        a = normalise(ans)
        if (norm == a) if rule.match == "exact" else _contains_words(norm, a):
            matched = ans
            break
    hit = next((f for f in rule.forbidden if _contains_words(norm, normalise(f))), None)
    failed = tuple(str(c) for c in rule.checks if not c(reply))
    reasons = []
    if rule.answers and matched is None:
        reasons.append(f"no accepted answer ({rule.match})")
    if hit is not None:
        reasons.append(f"forbidden {hit!r} present")
    if failed:
        reasons.append("failed " + ", ".join(failed))
    return Score(correct=not reasons, matched=matched, forbidden_hit=hit, failed_checks=failed,
                 reason="; ".join(reasons))
