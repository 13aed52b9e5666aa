"""The scripted agent session of ``kvcompact demo``.

A coding agent is asked to fix two failing tests in a small inventory module. The
tool calls and their outputs are fixed (read from files shipped in ``data/``) so
both runs of the demo see exactly the same observations; the model's replies are
real generations. Observations are the realistic kind that dominate an agent's
context: file reads, test logs, a documentation page, git history.

:data:`QUESTIONS` are the scored questions asked to both runs along the way (task accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from kvcompact.eval.scoring import Rule

SYSTEM_PROMPT = (
    "You are a careful coding agent. You work in a repository through tools "
    "(read_file, run, search_docs). After each tool result, say in one short sentence "
    "what you learned and what you will do next."
)

TASK = (
    "Two tests fail in the inventory service (tests/test_inventory.py). Find the causes, "
    "check the accounting spec, and propose minimal fixes."
)


@dataclass(frozen=True)
class Step:
    tool: str       # the tool the agent called, e.g. "read_file inventory.py"
    output: str     # what the tool returned (the observation)


def _data(name: str) -> str:
    return resources.files("kvcompact.demo").joinpath("data", name).read_text()


def _lines(text: str, start: int, end: int) -> str:
    numbered = [f"{i + 1:4d}  {line}" for i, line in enumerate(text.splitlines())]
    return "\n".join(numbered[start:end])


def _grep(text: str, needle: str, path: str) -> str:
    hits = [f"{path}:{i + 1}:{line}" for i, line in enumerate(text.splitlines()) if needle in line]
    return "\n".join(hits) or f"(no match for {needle!r})"


def build_steps() -> list[Step]:
    """The session's observations, in order (24 tool calls)."""
    inventory = _data("inventory.py")
    test_log = _data("test_log.txt")
    docs = _data("decimal_docs.txt")
    spec = _data("spec.md")
    git_log = _data("git_log.txt")
    listing = _data("ls_output.txt")
    fixed_once = test_log.replace("..........F.....F...", "..........F.........").split(
        "__________________________ test_average_price_empty")[0]
    fixed_once += "FAILED tests/test_inventory.py::test_stock_value_rounds\n1 failed, 19 passed in 0.38s\n"
    all_green = "$ python -m pytest tests/ -q\n....................  [100%]\n20 passed in 0.35s\n"
    patch_avg = (
        "--- a/inventory.py\n+++ b/inventory.py\n@@ def average_price(self) -> Decimal:\n"
        "         prices = [i.unit_price for i in self._items.values()]\n"
        "-        return sum(prices) / len(prices)\n"
        "+        if not prices:\n+            return Decimal(\"0.00\")\n"
        "+        return sum(prices) / len(prices)\n"
    )
    patch_value = (
        "--- a/inventory.py\n+++ b/inventory.py\n@@ def stock_value(self) -> Decimal:\n"
        "-        total = sum(i.unit_price * i.on_hand for i in self._items.values())\n"
        "-        return Decimal(total).quantize(Decimal(\"0.01\"), rounding=ROUND_HALF_UP)\n"
        "+        cents = Decimal(\"0.01\")\n"
        "+        return sum(\n+            ((i.unit_price * i.on_hand).quantize(cents, rounding=ROUND_HALF_UP)\n"
        "+             for i in self._items.values()),\n+            Decimal(\"0.00\"),\n+        )\n"
    )
    return [
        Step("run ls -la; ls tests docs", listing),
        Step("run python -m pytest tests/ -q", test_log),
        Step("read_file inventory.py", inventory),
        Step("read_file docs/accounting.md", spec),
        Step("run git log --oneline -12; git show --stat HEAD", git_log),
        Step("search_docs python decimal quantize rounding", docs),
        Step("run grep -n quantize inventory.py", _grep(inventory, "quantize", "inventory.py")),
        Step("read_file inventory.py (lines 60-70)", _lines(inventory, 59, 70)),
        Step("run grep -n average_price -r .", _grep(inventory, "average_price", "inventory.py")),
        Step("run python -c 'from decimal import *; print(sum([]))'", "0"),
        Step("apply_patch average_price guard", patch_avg + "\npatch applied: inventory.py (1 hunk)"),
        Step("run python -m pytest tests/ -q", fixed_once),
        Step("read_file inventory.py (lines 58-64)", _lines(inventory, 57, 64)),
        Step("run python -c 'from decimal import *; print(Decimal(\"0.105\")*3)'", "0.315"),
        Step("search_docs decimal quantize ROUND_HALF_UP per line item", docs.split("Important:")[1]),
        Step("apply_patch stock_value line-item rounding", patch_value + "\npatch applied: inventory.py (1 hunk)"),
        Step("run python -m pytest tests/ -q", all_green),
        Step("run git diff --stat", " inventory.py | 11 ++++++++---\n 1 file changed, 8 insertions(+), 3 deletions(-)"),
        Step("read_file docs/accounting.md (rule 5)", spec.split("5. ")[1].split("6. ")[0]),
        Step("run grep -n datetime.now inventory.py", _grep(inventory, "datetime.now", "inventory.py")),
        Step("read_file inventory.py (lines 1-30)", _lines(inventory, 0, 30)),
        Step("run python -m pytest tests/test_reorder.py -q", "....  [100%]\n4 passed in 0.12s\n"),
        Step("run ruff check inventory.py", "All checks passed!"),
        Step("run python -m pytest tests/ -q", all_green),
    ]


#: What the kvcompact run holds of a question's answer when it is asked (see :class:`Question`).
QUESTION_KINDS = ("kept", "truncated", "instruction")


@dataclass(frozen=True)
class Question:
    """A scored question, asked to both runs after ``step`` (after that step's compaction) and taken back.

    Attributes
    ----------
    step : int
        Asked after this step's reply (1-based), on the contexts both runs hold then.
    kind : {"kept", "truncated", "instruction"}
        Where the answer is in the kvcompact run's context at that moment: ``kept`` -- in an
        observation it still holds whole; ``truncated`` -- in the part of an observation its
        compaction cut away (the dense run still holds it); ``instruction`` -- in the task or the
        system prompt.
    prompt : str
        The user message.
    rule : kvcompact.eval.scoring.Rule
        How the reply is scored (:func:`kvcompact.eval.scoring.score`).
    source_step : int
        The step whose observation states the answer; 0: the system prompt or the task.
    """

    step: int
    kind: str
    prompt: str
    rule: Rule
    source_step: int


# Chosen so that SmolLM2-135M-Instruct answers each one right on the dense run's context (a
# question the reference cannot answer measures nothing): a small model answers when the question
# repeats the words just before the answer in the context and the answer is a few steps back.
# A fact cut from an observation is asked soon after the cut, while the dense run can still
# reach it. Budgets: the kvcompact run cuts step k's observation after step k + 2 (DemoConfig:
# observation_budget 96 tokens, keep_recent 4 messages); it drops the task after step 13.
QUESTIONS = (
    Question(1, "instruction", "What kind of fixes does the task ask you to propose?",
             Rule(answers=("minimal",)), source_step=0),
    Question(2, "kept", "What ZeroDivisionError message did the test log show?",
             Rule(answers=("division by zero",)), source_step=2),
    # the AssertionError line is in the middle of the test log, which is cut after step 4
    Question(4, "truncated", "What did the AssertionError assert in test_stock_value_rounds?",
             Rule(answers=("0.32",)), source_step=2),
    # `reorder_point: int = 10` is line 16 of inventory.py, cut after step 5
    Question(5, "truncated", "What is the default reorder_point of an Item?",
             Rule(answers=("10",)), source_step=3),
    # test_average_price_empty was fixed at step 11: naming it is the stale answer
    Question(12, "kept", "Which test FAILED in the last test run?",
             Rule(answers=("stock_value_rounds",), forbidden=("average_price_empty",)), source_step=12),
    # rule 5 of the spec, re-read at step 19 (the whole spec, read at step 4, is dropped by then)
    Question(24, "kept", "Which ticket tracks the naive datetime issue?",
             Rule(answers=("INV-212",)), source_step=19),
)
