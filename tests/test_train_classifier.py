"""`lamda-edge train` for every task (lamda_edge/train/labels.py, pairs.py, the recipe's `task`): a classifier from
JSONL text/label with held-out accuracy and its label map, and the refusals of bad task/data pairs (exit 2)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

WORDS = "good great fine nice bad awful poor sad the a movie film was is very".split()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMDA_EDGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return tiny.tokenizer([" ".join(WORDS)] * 5, vocab_size=300)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tiny, tokenizer):
    """A tiny DeBERTa-v2 (v3 attention) encoder without a head: the run adds and trains one."""
    folder = tmp_path_factory.mktemp("deberta")
    tiny.save(folder, "deberta-v2-encoder", tokenizer=tokenizer, hidden=32, positions=64)
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_run):
    return tiny_run.model_dir(tmp_path_factory.mktemp("llama"))


def label_rows(n: int, seed: int = 0, pair: bool = False) -> list[dict]:
    """Sentences labelled 'pos' when they hold more of the first four WORDS than of the next four."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.choices(WORDS, k=6)
        score = sum(w in WORDS[:4] for w in words) - sum(w in WORDS[4:8] for w in words)
        row = {"text": " ".join(words), "label": "pos" if score >= 0 else "neg"}
        if pair:
            row["text_pair"] = " ".join(rng.choices(WORDS, k=3))
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output", str(out), "--quantize", "none",
            "--rank", "4", "--batch-size", "8", "--seq-len", "32", "--max-steps", "6", "--quiet", "save_steps=3",
            "eval_steps=3", "lr=5e-3", "precision=fp32", "eval_fraction=0.25", *extra]


def test_classifier_trains_from_the_cli_with_accuracy_and_label_map(tmp_path, classifier_dir):
    from lamda_edge.cli import main

    data = write_jsonl(tmp_path / "sst.jsonl", label_rows(48, pair=True))
    out = tmp_path / "run"
    assert main(run_args(classifier_dir, data, out, "--task", "sequence-classification")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "sequence-classification"
    assert "packing: false" in (out / "run_config.yaml").read_text()  # packing: null leaves classifiers padded
    evals = metrics["eval"]
    assert [e["step"] for e in evals] == [0, 3, 6]
    assert all(0.0 <= e["eval_accuracy"] <= 1.0 and "eval_perplexity" not in e for e in evals)
    info = json.loads((out / "lamda_adapter.json").read_text())
    assert info["task"] == "sequence-classification" and info["num_labels"] == 2
    assert info["labels"] == {"names": ["neg", "pos"], "strings": True}
    assert set(info["modules_to_save"]) == {"pooler", "classifier"}  # the new head trains in full, unadapted
    from safetensors.torch import load_file

    saved = load_file(str(out / "lamda_adapter.safetensors"))
    assert "classifier.weight" in saved and not any(k.startswith("classifier.lamda") for k in saved)


def test_classifier_trains_from_csv(tmp_path, classifier_dir):
    """A CSV of text, label (its header names the fields) trains as the JSONL does (lamda_edge/train/formats.py)."""
    import csv

    from lamda_edge.cli import main

    rows = label_rows(48)
    with (tmp_path / "sst.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "run"
    assert main(run_args(classifier_dir, tmp_path / "sst.csv", out, "--task", "sequence-classification")) == 0
    info = json.loads((out / "lamda_adapter.json").read_text())
    assert info["labels"] == {"names": sorted({r["label"] for r in rows}), "strings": True}


def test_classifier_run_with_progress_reports_accuracy(tmp_path, classifier_dir, capsys):
    """Without --quiet: each evaluation and the end-of-run summary give the accuracy (a classifier has no
    perplexity; the summary used to fail on it with a KeyError), and the summary names the int8 export."""
    from lamda_edge.cli import main

    data = write_jsonl(tmp_path / "sst.jsonl", label_rows(48, pair=True))
    args = [a for a in run_args(classifier_dir, data, tmp_path / "run", "--task", "sequence-classification")
            if a != "--quiet"]
    assert main(args) == 0
    captured = capsys.readouterr()
    shown = captured.out + captured.err
    assert "perplexity" not in shown and "Traceback" not in shown
    assert re.search(r"before training: eval loss [0-9.]+, accuracy [0-9.]+%", shown)
    assert re.search(r"eval loss [0-9.]+ before training -> [0-9.]+ at step 6 \(accuracy [0-9.]+% -> [0-9.]+%\)",
                     captured.out)
    assert f"next: lamda-edge export --adapter {tmp_path / 'run'}" in captured.out and "--int8" in captured.out


def test_integer_labels_keep_their_ids(tmp_path, classifier_dir):
    from lamda_edge.train.labels import load_labels
    from lamda_edge.train.recipe import _load_tokenizer

    rows = [{"text": r["text"], "label": 2 if r["label"] == "pos" else 0} for r in label_rows(10)]
    splits = load_labels(write_jsonl(tmp_path / "d.jsonl", rows), _load_tokenizer(classifier_dir), 32)
    assert splits.label_map.num_labels == 3 and not splits.label_map.strings
    assert sorted({int(splits.train[i]["labels"]) for i in range(len(splits.train))}) == [0, 2]


@pytest.mark.parametrize(
    "rows, args, expected",
    [
        pytest.param([{"text": "good film", "label": "pos"}, {"text": "bad"}], ["--task", "sequence-classification"],
                     "line 2: missing field 'label'", id="classification-missing-label"),
        pytest.param([{"text": "good", "label": 1}, {"text": "bad", "label": "neg"}],
                     ["--task", "sequence-classification"], "mix integers", id="mixed-labels"),
        pytest.param([{"source": "a", "target": "b"}], ["--task", "seq2seq"], "needs an encoder-decoder",
                     id="seq2seq-on-decoder"),
        pytest.param([{"text": "x"}], ["--task", "regression"], "`task` should be one of", id="unknown-task"),
    ],
)
def test_bad_task_or_data_exits_2(tmp_path, capsys, classifier_dir, llama_dir, rows, args, expected):
    from lamda_edge.cli import main

    model = llama_dir if "seq2seq" in args else classifier_dir
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert main(run_args(model, data, tmp_path / "out", *args)) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_overflow_error_names_the_line(tmp_path, capsys, classifier_dir):
    from lamda_edge.cli import main

    rows = [{"text": "good film", "label": "pos"}, {"text": " ".join(["very"] * 80), "label": "neg"}]
    data = write_jsonl(tmp_path / "long.jsonl", rows * 2)
    assert main(run_args(classifier_dir, data, tmp_path / "out", "--task", "sequence-classification",
                         "on_overflow=error")) == 2
    assert "line 2:" in capsys.readouterr().err
