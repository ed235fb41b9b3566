"""Tests for lamda_edge/demo.py: the built-in GSM-style task, its answer extraction, and its metrics."""

from __future__ import annotations

import math

import pytest
import torch

from lamda_edge.demo import task as demo
from lamda_edge.errors import DataError
from lamda_edge.train.data import IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer(tiny):
    """The test tokenizer (vocab 500), trained on a few generated problems."""
    import reasoning_gym

    source = reasoning_gym.create_dataset(demo.DATASET, size=20, seed=123)
    return tiny.tokenizer([source[i]["question"] + " " + source[i]["metadata"]["answer_cot"] for i in range(20)],
                          vocab_size=500)


@pytest.fixture(scope="module")
def task(tokenizer):
    return demo.make_task(tokenizer, n_train=6, n_eval=4, seq_len=320, seed=0, max_answer_tokens=120)


def tiny_llama(tiny, vocab: int):
    return tiny.model("llama", vocab=vocab, hidden=32, positions=1024).train()


def test_task_sizes_and_disjoint_split(task):
    assert (len(task.train), len(task.eval)) == (6, 4)
    assert (len(task.train_problems), len(task.eval_problems)) == (6, 4)
    train_questions = {p["question"] for p in task.train_problems}
    assert not train_questions & {p["question"] for p in task.eval_problems}


def test_task_is_seeded(tokenizer, task):
    again = demo.make_task(tokenizer, n_train=6, n_eval=4, seq_len=320, seed=0, max_answer_tokens=120)
    other = demo.make_task(tokenizer, n_train=6, n_eval=4, seq_len=320, seed=1, max_answer_tokens=120)
    assert [p["question"] for p in again.eval_problems] == [p["question"] for p in task.eval_problems]
    assert [p["question"] for p in other.eval_problems] != [p["question"] for p in task.eval_problems]


def test_loss_only_on_the_worked_answer(tokenizer, task):
    for i, problem in enumerate(task.train_problems):
        item = task.train[i]
        trained = [t for t, label in zip(item["input_ids"].tolist(), item["labels"].tolist()) if label != IGNORE_INDEX]
        text = tokenizer.decode(trained)
        assert text == problem["worked"] + "<|im_end|>\n"
        assert text.rstrip().removesuffix("<|im_end|>").rstrip().endswith(f"#### {problem['answer']}")
        assert problem["question"] in tokenizer.decode(item["input_ids"])


def test_length_filters_hold(tokenizer):
    small = demo.make_task(tokenizer, n_train=4, n_eval=2, seq_len=280, seed=0, max_answer_tokens=90)
    assert small.skipped > 0
    for i in range(len(small.train)):
        assert len(small.train[i]["input_ids"]) <= 280
        assert sum(label != IGNORE_INDEX for label in small.train[i]["labels"].tolist()) <= 90 + 2  # + end of turn
    with pytest.raises(DataError, match="fit seq_len=16"):
        demo.make_task(tokenizer, n_train=2, n_eval=1, seq_len=16, seed=0)


@pytest.mark.parametrize(
    "text, number",
    [
        pytest.param("3 + 4 = 7\n#### 7", "7", id="marker"),
        pytest.param("so 1,200 apples\n#### 1,250", "1250", id="commas"),
        pytest.param("#### -3.5 and then 9", "-3.5", id="first-marker"),
        pytest.param("the total is 12 then 15.", "15", id="last-number"),
        pytest.param("no numbers here", None, id="none"),
    ],
)
def test_final_number(text, number):
    assert demo.final_number(text) == number


@pytest.mark.parametrize(
    "text, stopped, ok",
    [
        pytest.param("2 * 3 = 6\n#### 6", True, True, id="good"),
        pytest.param("2 * 3 = 6\n#### 6", False, False, id="not-stopped"),
        pytest.param("#### 6\n#### 6", True, False, id="repeated"),
        pytest.param("the answer is 6", True, False, id="no-marker"),
        pytest.param("#### 6 apples", True, False, id="trailing-text"),
    ],
)
def test_in_format(text, stopped, ok):
    assert demo.in_format(text, stopped) is ok


@pytest.mark.parametrize(
    "text, stop",
    [
        pytest.param("3 * 4 = 12\n#### 12\n#### 12", True, id="repeats"),
        pytest.param("#### 12\nSo the answer", True, id="more-text"),
        pytest.param("3 * 4 = 12\n#### 12", False, id="at-number"),
        pytest.param("#### 12\n", False, id="newline-only"),
        pytest.param("3 * 4 = 12\n", False, id="no-marker"),
    ],
)
def test_generation_stops_past_the_final_answer(tokenizer, text, stop):
    criterion = demo._past_final_answer(tokenizer)
    prompt = tokenizer("question", add_special_tokens=False)["input_ids"]
    answer = tokenizer(text, add_special_tokens=False)["input_ids"]
    criterion(torch.tensor([prompt + answer[:1]]), None)  # first call fixes the prompt length
    assert criterion(torch.tensor([prompt + answer]), None).tolist() == [stop]


def test_is_correct_uses_the_scorer(task):
    problem = task.eval_problems[0]
    assert demo.is_correct(f"work\n#### {problem['answer']}", problem, task.scorer)
    assert not demo.is_correct(f"#### {int(float(problem['answer'])) + 1}", problem, task.scorer)
    assert not demo.is_correct("no idea", problem, task.scorer)


def test_evaluate_scores_reference_answers_as_perfect(tiny, tokenizer, task, monkeypatch):
    """With answers replaced by the references, accuracy and format rate are 1; with wrong numbers, 0."""
    model = tiny_llama(tiny, len(tokenizer))
    refs = [(p["worked"], True) for p in task.eval_problems]
    monkeypatch.setattr(demo, "generate_answers", lambda *a, **k: refs)
    metrics = demo.evaluate(model, tokenizer, task)
    assert (metrics.accuracy, metrics.format_rate, metrics.n_problems) == (1.0, 1.0, 4)
    wrong = [(p["worked"].rsplit("####", 1)[0] + "#### 999999", False) for p in task.eval_problems]
    monkeypatch.setattr(demo, "generate_answers", lambda *a, **k: wrong)
    metrics = demo.evaluate(model, tokenizer, task)
    assert (metrics.accuracy, metrics.format_rate) == (0.0, 0.0)


def test_evaluate_tiny_model_generates_and_loss_moves(tiny, tokenizer, task):
    """Real greedy generation on a tiny model, and the answer loss drops after a few steps on the answers."""
    model = tiny_llama(tiny, len(tokenizer))
    before = demo.evaluate(model, tokenizer, task, n_generate=2, max_new_tokens=4, batch_size=2)
    assert before.n_problems == 2 and 0.0 <= before.accuracy <= 1.0 and len(before.samples) == 2
    assert math.isclose(before.answer_perplexity, math.exp(before.answer_loss), rel_tol=1e-6)
    assert before.answer_loss > math.log(len(tokenizer)) * 0.8  # untrained: near uniform
    from lamda_edge.train.data import PaddingCollator

    batch = PaddingCollator.for_tokenizer(tokenizer)([task.eval[i] for i in range(len(task.eval))])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(8):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = demo.evaluate(model, tokenizer, task, n_generate=1, max_new_tokens=2)
    assert after.answer_loss < before.answer_loss - 0.5


def test_answer_loss_matches_hf_loss(tiny, tokenizer, task):
    """Our token-mean answer loss equals transformers' own loss on the same (single) example."""
    model = tiny_llama(tiny, len(tokenizer)).eval()
    item = task.eval[0]
    ours = demo.answer_loss(model, demo.TokenDataset([(item["input_ids"].tolist(), item["labels"].tolist())]), 0)
    with torch.no_grad():
        theirs = model(input_ids=item["input_ids"][None], labels=item["labels"][None]).loss.item()
    assert math.isclose(ours, theirs, rel_tol=1e-4)


def test_before_after_table():
    before = demo.DemoMetrics(0.0, 0.0, 1.5, math.exp(1.5), 32, 1.0, 1.0)
    after = demo.DemoMetrics(0.0625, 0.9, 0.5, math.exp(0.5), 32, 1.0, 1.0)
    table = demo.before_after(before, after.to_dict())
    assert "1.500" in table and "0.500" in table and "90%" in table and "6.2%" in table and "n=32" in table


@pytest.mark.slow
def test_default_model_baseline(tmp_path_factory):
    """The real default model answers a few held-out problems; its answer loss is finite and plausible."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lamda_edge.demo.default_model import default_model_path

    path = default_model_path(progress=False)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    real_task = demo.make_task(tok, n_train=4, n_eval=8, seq_len=256, seed=0)
    metrics = demo.evaluate(model, tok, real_task, n_generate=4, max_new_tokens=32, batch_size=4)
    assert 0.1 < metrics.answer_loss < 5.0
    assert all(isinstance(s["answer"], str) and s["answer"] for s in metrics.samples)
