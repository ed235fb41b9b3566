"""How `lamda-edge generate` stops (lamda_edge/runtime/generate.py; issue 18 items 6, 9): at the complete `#### N`
answer line with --task gsm, on a loop (the same run of tokens three times in a row), never by picking other tokens;
and `lamda-edge --help` written for users.
"""

from __future__ import annotations

import pytest

from lamda_edge.runtime.generate import answer_line_stop, any_stop, repetition_stop


@pytest.mark.parametrize("tokens, stops", [
    pytest.param([5, 6, 7, 5, 6, 7, 5, 6, 7], True, id="three-times-3-tokens"),
    pytest.param([1, 2, 3, 4, 9, 9, 9, 9, 9, 9], True, id="one-token-6-times"),
    pytest.param([5, 6, 7, 5, 6, 7, 5, 6], False, id="not-yet-three"),
    pytest.param(list(range(40)), False, id="no-loop"),
    pytest.param([3, 3, 3], False, id="short-run-of-one-token"),
])
def test_repetition_stop(tokens, stops):
    assert (repetition_stop(tokens) == "repetition") is stops


@pytest.mark.parametrize("text, stops", [
    pytest.param("5 * 8 = 40\n40 - 6 = 34\n#### 34\n", True, id="complete-line"),
    pytest.param("5 * 8 = 40\n#### 3", False, id="number-may-go-on"),
    pytest.param("5 * 8 = 40\n", False, id="no-answer-yet"),
])
def test_answer_line_stop(tiny, text, stops):
    tokenizer = tiny.tokenizer([text, "#### 34 is the answer"] * 3, vocab_size=300)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert (answer_line_stop(tokenizer)(ids) == "answer") is stops


def test_any_stop_gives_the_first_reason():
    stop = any_stop(None, lambda ids: None, lambda ids: "repetition" if len(ids) > 2 else None)
    assert stop([1, 2]) is None and stop([1, 2, 3]) == "repetition"


def test_top_level_help_is_written_for_users(capsys):
    from lamda_edge.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "lamda-edge train" in text and "lamda-edge export" in text and "lamda-edge generate" in text
    assert "_add_" not in text and "_run_" not in text and "cli_flags" not in text
