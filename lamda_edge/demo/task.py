"""The built-in task when no --data is given: GSM8K-style word problems from reasoning-gym.

`reasoning_gym.create_dataset("gsm_symbolic", size=N, seed=S)` generates templated grade-school
word problems with a worked answer (``metadata["answer_cot"]``, ending in ``#### <number>``) and a
scorer. One dataset of ``n_train + n_eval`` problems is generated and split by index (problem i
is seeded by ``seed + i``, so train and held-out problems never coincide). Problems are kept
only when their chat rendering fits `seq_len` and their worked answer is short (`max_answer_tokens`),
which keeps training steps and greedy evaluation cheap on a CPU.

Each problem becomes a chat example (loss on the assistant turn only):

    system:    SYSTEM_PROMPT
    user:      <question>
    assistant: <short worked answer> ... #### <number>

Three before/after metrics (`evaluate`): exact-match accuracy of greedy answers (the final number
after ``####``, else the last number, scored by reasoning-gym's scorer), the rate of answers in the
trained format (one ``#### <number>`` at the end, then the end-of-turn token), and the held-out loss
/ perplexity of the reference answers. A 135M model barely moves exact-match accuracy within the
10-minute CPU budget; the format rate and the answer loss move reliably (see `evaluate`).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lamda_edge.errors import DataError, ModelError, require
from lamda_edge.progress import bar
from lamda_edge.train.data import IGNORE_INDEX, PaddingCollator, TokenDataset, tokenize_messages
from lamda_edge.train.loss import causal_lm_loss

SYSTEM_PROMPT = "Solve the math word problem. Show short steps, then give the final number after ####."
DATASET = "gsm_symbolic"
FINAL_RE = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
FORMAT_RE = re.compile(r"####\s*-?[\d,]*\.?\d+\s*$")
PAST_FINAL_RE = re.compile(r"####\s*-?[\d,]*\.?\d+[ \t]*\n\s*\S")  # more text after the final-answer line


@dataclass
class DemoTask:
    """The built-in task: chat-formatted train/held-out problems and their token datasets."""

    train_problems: list[dict[str, Any]]
    eval_problems: list[dict[str, Any]]
    train: TokenDataset
    eval: TokenDataset
    scorer: Any = field(repr=False, default=None)  # reasoning-gym dataset (has score_answer)
    skipped: int = 0


def problem_messages(question: str, answer: str | None = None) -> list[dict[str, str]]:
    """The chat messages of one problem (without the assistant turn when `answer` is None)."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def worked_answer(entry: dict[str, Any]) -> str:
    """The short worked answer of a reasoning-gym entry, ending in ``#### <number>``."""
    cot = entry["metadata"].get("answer_cot") or ""
    cot = "\n".join(line.rstrip() for line in cot.strip().splitlines())
    if not FINAL_RE.search(cot):
        cot = f"{cot}\n#### {entry['answer']}".strip()
    return cot


def make_task(
    tokenizer,
    n_train: int = 256,
    n_eval: int = 48,
    seq_len: int = 256,
    seed: int = 0,
    max_answer_tokens: int = 96,
    dataset: str = DATASET,
    dataset_options: dict[str, Any] | None = None,
) -> DemoTask:
    """Generate the built-in task and tokenize it with the model's chat template.

    Args:
        tokenizer: the model's tokenizer (needs a chat template).
        n_train: training problems to keep.
        n_eval: held-out problems to keep (accuracy and answer loss are measured on them).
        seq_len: the longest tokenized example; longer problems are skipped, never truncated.
        seed: reasoning-gym seed.
        max_answer_tokens: skip problems whose worked answer is longer (keeps generation short).
        dataset: the reasoning-gym dataset (its entries need `question` and `answer`; a worked answer is taken
            from `metadata["answer_cot"]` when there is one, else the answer is `#### <answer>`).
        dataset_options: further fields of the dataset's reasoning-gym config (e.g. `{"max_digits": 2}`).

    Raises:
        MissingDependencyError: reasoning-gym is not installed (``pip install 'lamda-edge[demo]'``).
        DataError: too few problems fit `seq_len` / `max_answer_tokens`.
    """
    reasoning_gym = require("reasoning_gym", extra="demo")
    wanted = n_train + n_eval
    size = int(wanted * 2.2) + 16  # about 55% of problems pass the length filters
    source = reasoning_gym.create_dataset(dataset, size=size, seed=seed, **(dataset_options or {}))
    kept: list[tuple[dict[str, Any], list[int], list[int]]] = []
    skipped = 0
    for index in range(size):
        entry = source[index]
        answer = worked_answer(entry)
        if len(tokenizer(answer, add_special_tokens=False)["input_ids"]) > max_answer_tokens:
            skipped += 1
            continue
        ids, labels = tokenize_messages(tokenizer, problem_messages(entry["question"], answer))
        if len(ids) > seq_len:
            skipped += 1
            continue
        problem = {"question": entry["question"], "answer": entry["answer"], "worked": answer, "entry": entry}
        kept.append((problem, ids, labels))
        if len(kept) == wanted:
            break
    if len(kept) < wanted:
        raise DataError(
            f"only {len(kept)} of {wanted} generated problems fit seq_len={seq_len} and "
            f"max_answer_tokens={max_answer_tokens}. Fix: raise seq_len or lower n_train/n_eval"
        )
    train, held = kept[:n_train], kept[n_train:]
    return DemoTask(
        train_problems=[p for p, _, _ in train],
        eval_problems=[p for p, _, _ in held],
        train=TokenDataset([(ids, labels) for _, ids, labels in train]),
        eval=TokenDataset([(ids, labels) for _, ids, labels in held]),
        scorer=source,
        skipped=skipped,
    )


def final_number(text: str) -> str | None:
    """The number after the first ``####``, else the last number in `text` (commas removed)."""
    match = FINAL_RE.search(text)
    if match:
        return match.group(1).replace(",", "")
    numbers = NUMBER_RE.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def is_correct(answer_text: str, problem: dict[str, Any], scorer=None) -> bool:
    """Exact match of the extracted final number with the reference (reasoning-gym's scorer when given)."""
    number = final_number(answer_text)
    if number is None:
        return False
    if scorer is not None:
        return scorer.score_answer(number, problem["entry"]) == 1.0
    try:
        return float(number) == float(problem["answer"])
    except ValueError:
        return False


def in_format(answer_text: str, stopped: bool) -> bool:
    """True when the answer ends with one ``#### <number>`` and generation stopped by itself."""
    return stopped and answer_text.count("####") == 1 and bool(FORMAT_RE.search(answer_text.strip()))


def _count_steps(progress):
    """A `StoppingCriteria` that never stops: it moves `progress` one step per generated token."""
    from transformers import StoppingCriteria

    class CountSteps(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            progress.update(1)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return CountSteps()


def _past_final_answer(tokenizer, tail_tokens: int = 24):
    """A `StoppingCriteria` that ends a row once text follows its ``#### <number>`` line.

    Such an answer is already decided: its final number is fixed and it is out of format, so generating
    on (an untrained model repeats ``#### n`` lines until `max_new_tokens`) only costs time.
    """
    from transformers import StoppingCriteria

    class PastFinalAnswer(StoppingCriteria):
        def __init__(self):
            self.prompt_len = None

        def __call__(self, input_ids, scores, **kwargs):  # input_ids (B, T)
            if self.prompt_len is None:
                self.prompt_len = input_ids.shape[1] - 1
            tails = input_ids[:, max(self.prompt_len, input_ids.shape[1] - tail_tokens) :]
            texts = tokenizer.batch_decode(tails, skip_special_tokens=True)
            return torch.tensor([bool(PAST_FINAL_RE.search(t)) for t in texts], device=input_ids.device)

    return PastFinalAnswer()


@torch.no_grad()
def generate_answers(
    model, tokenizer, problems: list[dict[str, Any]], max_new_tokens: int = 112, batch_size: int = 16,
    progress: bool = False,
) -> list[tuple[str, bool]]:
    """Greedy answers to `problems` (left-padded batches); each is ``(text, stopped at end-of-turn)``.

    `progress`: a bar over decode steps (at most `max_new_tokens` per batch; a batch that stops early jumps ahead).
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prompts = [
        tokenizer.apply_chat_template(problem_messages(p["question"]), tokenize=False, add_generation_prompt=True)
        for p in problems
    ]
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    results = []
    steps = bar(math.ceil(len(prompts) / batch_size) * max_new_tokens, "answering held-out problems", progress,
                unit="token")
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                 eos_token_id=eos,
                                 stopping_criteria=[_past_final_answer(tokenizer), _count_steps(steps)])
            steps.update((start // batch_size + 1) * max_new_tokens - steps.n)  # the batch is done
            # out: (B, T_prompt + T_new)
            new = out[:, enc["input_ids"].shape[1] :]  # (B, T_new)
            for row in new:
                stopped = bool((row == eos).any())
                results.append((tokenizer.decode(row, skip_special_tokens=True), stopped))
    finally:
        steps.close()
        tokenizer.padding_side = side
        model.train(was_training)
    return results


@torch.no_grad()
def answer_loss(model, dataset: TokenDataset, pad_token_id: int, batch_size: int = 8, progress: bool = False) -> float:
    """Mean cross-entropy (nats per token) of the reference answers, teacher-forced, on the held-out set."""
    device = next(model.parameters()).device
    collate = PaddingCollator(pad_token_id)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    batches = bar(math.ceil(len(dataset) / batch_size), "held-out answer loss", progress, unit="batch")
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # predicted tokens (labels shift by one)
            try:  # the output head runs on the answer rows only (no (B, T, V) logits)
                mean = causal_lm_loss(model, batch, chunk_rows=256)
            except ModelError:
                mean = causal_lm_loss(model, batch, chunk_rows=None)
            total += float(mean) * n
            count += n
            batches.update(1)
    finally:
        batches.close()
        model.train(was_training)
    return total / max(count, 1)


@dataclass
class DemoMetrics:
    """Before/after numbers of the built-in task."""

    accuracy: float
    format_rate: float
    answer_loss: float
    answer_perplexity: float
    n_problems: int
    generate_seconds: float
    loss_seconds: float
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return (
            f"accuracy {self.accuracy:.1%} ({round(self.accuracy * self.n_problems)}/{self.n_problems}), "
            f"answers in format {self.format_rate:.0%}, held-out answer loss {self.answer_loss:.3f} "
            f"(perplexity {self.answer_perplexity:.2f})"
        )


def evaluate(
    model,
    tokenizer,
    task: DemoTask,
    n_generate: int | None = None,
    max_new_tokens: int = 112,
    batch_size: int = 16,
    n_samples: int = 3,
    progress: bool = False,
) -> DemoMetrics:
    """Measure the built-in task's metrics on the held-out problems.

    Args:
        model: a causal LM (any of: plain, NF4 base with LaMDA adapters, merged).
        tokenizer: its tokenizer.
        task: from `make_task`.
        n_generate: how many held-out problems to answer greedily (default: all); the answer loss
            always uses all held-out problems (it is a single forward pass each, cheap).
        max_new_tokens: generation budget per answer (worked answers are at most `max_answer_tokens`).
        batch_size: problems per generate call.
        n_samples: how many (question, answer) pairs to keep for display.
        progress: show bars (with an ETA) for the answers and the loss on stderr.

    Returns:
        `DemoMetrics`: exact-match accuracy, format rate, answer loss and perplexity, timings.
    """
    problems = task.eval_problems[: n_generate or len(task.eval_problems)]
    start = time.perf_counter()
    answers = generate_answers(model, tokenizer, problems, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               progress=progress)
    generate_seconds = time.perf_counter() - start
    correct = [is_correct(text, p, task.scorer) for (text, _), p in zip(answers, problems)]
    formatted = [in_format(text, stopped) for text, stopped in answers]
    start = time.perf_counter()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loss = answer_loss(model, task.eval, pad, progress=progress)
    loss_seconds = time.perf_counter() - start
    samples = [
        {"question": p["question"], "reference": p["answer"], "answer": text, "correct": ok}
        for (text, _), p, ok in list(zip(answers, problems, correct))[:n_samples]
    ]
    n = max(len(problems), 1)
    return DemoMetrics(
        accuracy=sum(correct) / n,
        format_rate=sum(formatted) / n,
        answer_loss=loss,
        answer_perplexity=math.exp(min(loss, 50.0)),
        n_problems=len(problems),
        generate_seconds=generate_seconds,
        loss_seconds=loss_seconds,
        samples=samples,
    )


def before_after(before: DemoMetrics | dict[str, Any], after: DemoMetrics | dict[str, Any]) -> str:
    """A small before/after table of the demo metrics (accepts `DemoMetrics` or their `to_dict()`)."""
    b = before.to_dict() if isinstance(before, DemoMetrics) else before
    a = after.to_dict() if isinstance(after, DemoMetrics) else after
    rows = [
        ("held-out answer loss", f"{b['answer_loss']:.3f}", f"{a['answer_loss']:.3f}"),
        ("answer perplexity", f"{b['answer_perplexity']:.2f}", f"{a['answer_perplexity']:.2f}"),
        ("answers in format", f"{b['format_rate']:.0%}", f"{a['format_rate']:.0%}"),
        (f"exact-match accuracy (n={a['n_problems']})", f"{b['accuracy']:.1%}", f"{a['accuracy']:.1%}"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'demo task':<{width}}  {'before':>8}  {'after':>8}"]
    lines += [f"{name:<{width}}  {x:>8}  {y:>8}" for name, x, y in rows]
    return "\n".join(lines)
