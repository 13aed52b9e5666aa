"""The eval's scoring rule on hand-written answers: right, wrong, reworded, stale, instructions."""

import pytest

from kvcompact.eval.scoring import CHECKS, Check, Rule, normalise, score


@pytest.mark.parametrize("text, expected", [
    ("The total is $4,096.50!", "total is 4096 5"),
    ("4,096", "4096"),
    ("$12.50", "12 5"),
    ("12.50", "12 5"),
    ("12.00 EUR", "12 eur"),
    ("version 2.4.0", "version 2 4 0"),     # a version is not a number: its zeros stay
    ("agent 007", "agent 007"),             # leading zeros of an id stay
    ("1,2,3", "1 2 3"),                     # a list is not a thousands separator
    ("An Apple a day", "apple day"),
    ("  src/App.py\n", "src app py"),
    ("test_stock_value", "test stock value"),
    ("ﬁle", "file"),                        # NFKC ligature
])
def test_normalise(text, expected):
    assert normalise(text) == expected


def test_number_formats_compare_equal():
    assert normalise("4,096") == normalise("4096")
    assert normalise("$12.50") == normalise("12.5")
    assert normalise("12.5") != normalise("125")


def test_right_answer_contains():
    assert score("payments-api listens on port 9443.", Rule(answers=("9443",))).correct


def test_wrong_answer():
    s = score("It listens on port 4453.", Rule(answers=("9443",)))
    assert not s.correct and "no accepted answer" in s.reason


def test_whole_words_only():
    assert not score("port 94430", Rule(answers=("9443",))).correct
    assert not score("src/app.pyc", Rule(answers=("src/app.py",))).correct
    assert score("It is in src/app.py, line 3", Rule(answers=("src/app.py",))).correct


@pytest.mark.parametrize("reply", [
    "The on-call engineer is MARTA KOWALSKI",
    "marta kowalski.",
    "It's Marta Kowalski (on call this week)",
])
def test_right_but_reworded(reply):
    assert score(reply, Rule(answers=("Marta Kowalski",))).correct


def test_reworded_numbers():
    assert score("Revenue was $4,812.50 in total", Rule(answers=("4812.5",))).correct
    assert score("4812.50", Rule(answers=("$4,812.5",), match="exact")).correct


def test_any_accepted_answer():
    rule = Rule(answers=("db-primary.internal", "db-primary"))
    assert score("the host db-primary", rule).matched == "db-primary"


def test_exact_rejects_extra_words():
    rule = Rule(answers=("9443",), match="exact")
    assert score("9,443.", rule).correct
    assert not score("port 9443", rule).correct


def test_stale_value_present_fails_even_with_the_right_one():
    rule = Rule(answers=("2.4.0",), forbidden=("2.3.1",))
    assert score("Deployed: 2.4.0", rule).correct
    s = score("It was 2.3.1, now 2.4.0", rule)
    assert not s.correct and s.forbidden_hit == "2.3.1" and s.matched == "2.4.0"


def test_instruction_uppercase():
    rule = Rule(checks=(Check("uppercase"),))
    assert score("THE PORT IS 9443.", rule).correct
    s = score("The port is 9443.", rule)
    assert not s.correct and s.failed_checks == ("uppercase",)
    assert not score("9443", rule).correct  # no letter: nothing shows the instruction was followed


def test_instruction_ends_with_token():
    rule = Rule(answers=("9443",), checks=(Check("ends_with", "OPS-4411"),))
    assert score("Port 9443. OPS-4411.", rule).correct
    assert score("Port 9443 (ops-4411)", rule).correct
    s = score("Port 9443.", rule)
    assert not s.correct and s.failed_checks == ("ends_with(OPS-4411)",)
    s = score("Port 4453. OPS-4411", rule)  # instruction followed, fact wrong
    assert not s.correct and s.failed_checks == () and s.matched is None


def test_instruction_starts_with_and_mentions_and_max_words():
    assert Check("starts_with", "Answer:")("\"answer: 12\"")
    assert not Check("starts_with", "Answer:")("The answer: 12")
    assert Check("mentions", "OPS-4411")("see ops 4411 for details")
    assert Check("max_words", "3")("one two three")
    assert not Check("max_words", "3")("one two three four")


def test_bad_rules_raise_clearly():
    with pytest.raises(ValueError, match="match must be one of"):
        Rule(answers=("x",), match="fuzzy")
    with pytest.raises(ValueError, match="answers"):
        Rule(answers="9443")  # a bare string, not a list
    with pytest.raises(ValueError, match="answers"):
        Rule(answers=("!!",))  # empty after normalisation
    with pytest.raises(ValueError, match="needs accepted answers, checks"):
        Rule()
    with pytest.raises(ValueError, match="Check.name must be one of"):
        Check("shouting")
    with pytest.raises(ValueError, match="needs an arg"):
        Check("ends_with")
    with pytest.raises(ValueError, match="takes no arg"):
        Check("uppercase", "x")
    with pytest.raises(ValueError, match="integer"):
        Check("max_words", "many")
    with pytest.raises(TypeError, match="reply must be a str"):
        score(None, Rule(answers=("x",)))


def test_every_check_is_documented():
    assert all(len(meaning) > 10 for _, _, meaning in CHECKS.values())
