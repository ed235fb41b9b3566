"""The served export: one shared generator (or encoder-decoder, or classifier) and the job each request runs on it.

    Job (prompt ids, budget, sampling, stop strings, deadline, cancel) ──> worker thread ──> Engine.run
        generator.generate(stop = loop guard | stop strings | cancelled | past the deadline, on_text = StopText)
                                    └──> pieces to the client as they come ──> Outcome (text, usage, finish_reason)

The ONNX Runtime sessions are loaded once and shared by every request (`Run` is thread-safe); tokenizing happens on
the event loop's thread, decoding in the workers. A stop, a disconnect or the deadline is checked after each token.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lamda_edge.errors import ModelError
from lamda_edge.files import read_json
from lamda_edge.serve.admission import deadline_error
from lamda_edge.serve.requests import ApiError

CLASSIFIER, GENERATOR, SEQ2SEQ = "classifier", "generator", "seq2seq"
LENGTH_REASONS = ("max_new_tokens", "context")  # GenerationResult.stopped_by values that are OpenAI's "length"


class Cancelled(Exception):
    """The client went away; its generation stopped after the token in progress."""


@dataclass(eq=False)  # each job is itself (kept in a set while it runs)
class Job:
    """One generation: what to run, and how the request can end it early (`cancel`, `deadline` on time.monotonic)."""

    ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    deadline: float = float("inf")
    cancel: threading.Event = field(default_factory=threading.Event)
    on_text: Callable[[str], None] | None = None  # called in the worker thread with each piece that is final


@dataclass
class Outcome:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"


class StopText:
    """Stop strings over text that grows token by token: where it ends, and how much of it is safe to send (a tail
    that may be the start of a stop string is held back until the next token settles it)."""

    def __init__(self, stops: tuple[str, ...], decode: Callable[[list[int]], str], on_text=None):
        self.stops, self.decode, self.on_text = stops, decode, on_text
        self.cut: int | None = None  # where the first stop string starts, once one is found
        self.text, self.sent = "", 0

    def check(self, new_ids: list[int]) -> str | None:
        """The stop predicate: 'stop_string' once the decoded new tokens hold a stop string."""
        if not self.stops:
            return None
        text = self.decode(new_ids)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.cut = min(hits)
            return "stop_string"
        return None

    def feed(self, piece: str) -> None:
        """A piece of streamed text: send what no stop string can still claim."""
        self.text += piece
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        self._send(len(self.text) - hold if self.cut is None else self.cut)  # the generator's last flush: cut

    def finish(self, text: str) -> str:
        """The final text (cut before the stop string), with whatever was held back sent."""
        self.text = text if self.cut is None else text[:self.cut]
        self._send(len(self.text))
        return self.text

    def _send(self, end: int) -> None:
        if self.on_text and end > self.sent:
            self.on_text(self.text[self.sent:end])
            self.sent = end


class Engine:
    """An export folder loaded once: `kind` (generator, seq2seq or classifier), `context`, and `run` / `classify`."""

    def __init__(self, folder: str | Path, onnx_file: str | None = None, threads: int | None = None):
        from lamda_edge.runtime.seq2seq import OnnxSeq2Seq, is_seq2seq_folder

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ModelError(f"--model {folder} is not a folder. Fix: pass the --output folder of `lamda-edge export`")
        self.kind = SEQ2SEQ if is_seq2seq_folder(self.folder) else CLASSIFIER if _is_classifier(self.folder) \
            else GENERATOR
        if self.kind == CLASSIFIER:
            from lamda_edge.runtime.classify import OnnxClassifier

            self.model = OnnxClassifier(self.folder, onnx_file)
            self._lock = threading.Lock()  # the tokenizer pads in place: one batch at a time through it
        elif self.kind == SEQ2SEQ:
            self.model = OnnxSeq2Seq(self.folder, threads)
        else:
            from lamda_edge.runtime.generate import load_generator

            self.model = load_generator(self.folder, onnx_file=onnx_file, threads=threads)
        self.tokenizer = self.model.tokenizer
        self.onnx_file = self.model.onnx_file
        self.context = getattr(self.model, "context", None) or _positions(self.folder)
        self.default_temperature = 0.0 if self.kind == SEQ2SEQ else 1.0  # OpenAI's 1; an encoder-decoder is greedy

    # ---- on the event loop's thread ----

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Prompt ids of a conversation, in the export's chat template (400 when there is none)."""
        self._require_generator()
        if self.kind == SEQ2SEQ or not self.model.has_chat_template:
            raise ApiError(400, f"{self.folder.name} has no chat template (an encoder-decoder, or a tokenizer "
                           "without one). Fix: use POST /v1/completions with a prompt", param="messages")
        return self.model.encode_messages(messages)

    def encode_text(self, prompt: str) -> list[int]:
        """Prompt ids of raw text (no chat template)."""
        self._require_generator()
        return list(self.tokenizer(prompt)["input_ids"])

    def check_sampling(self, temperature: float) -> None:
        if self.kind == SEQ2SEQ and temperature > 0:
            raise ApiError(400, "an encoder-decoder export generates greedily only. Fix: \"temperature\": 0",
                           param="temperature")

    # ---- in a worker thread ----

    def run(self, job: Job) -> Outcome:
        """Generate for `job`; raises `Cancelled` when its client left, a 504 `ApiError` past its deadline."""
        from lamda_edge.runtime.generate import any_stop, repetition_stop

        stops = StopText(job.stop, self._decode, job.on_text)

        def interrupted(new) -> str | None:
            if job.cancel.is_set():
                return "cancelled"
            return "deadline" if time.monotonic() > job.deadline else None

        if self.kind == SEQ2SEQ:  # as `generate` runs it: greedy, no loop guard
            ask, reasons = any_stop(interrupted, stops.check), [None]

            def stop(new):
                reasons.append(ask(new))
                return reasons[-1]

            new = self.model.generate_ids(job.ids, job.max_tokens, stop=stop)
            reason = reasons[-1] or ("eos" if new and new[-1] == self.model.eos else "max_new_tokens")
            text = self._decode(new)
        else:
            stop = any_stop(interrupted, None if job.ignore_eos else repetition_stop, stops.check)
            seed = secrets.randbits(32) if job.seed is None else job.seed
            result = self.model.generate("", max_new_tokens=job.max_tokens, temperature=job.temperature,
                                         top_p=job.top_p, seed=seed, prompt_ids=job.ids, on_text=stops.feed,
                                         ignore_eos=job.ignore_eos, stop=stop)
            new, reason, text = result.token_ids, result.stopped_by, result.text
        if reason == "cancelled":
            raise Cancelled
        if reason == "deadline":
            raise deadline_error(f"generating (after {len(new)} tokens)")
        return Outcome(stops.finish(text), len(job.ids), len(new), "length" if reason in LENGTH_REASONS else "stop")

    def classify(self, texts: list[str], pairs: list[str] | None):
        """(predictions, prompt tokens) for a batch of texts."""
        if self.kind != CLASSIFIER:
            raise ApiError(404, f"{self.folder.name} is a {self.kind}, not a classifier. Fix: use "
                           "POST /v1/chat/completions or /v1/completions", code="not_a_classifier")
        with self._lock:
            lengths = [len(ids) for ids in self.tokenizer(texts, pairs)["input_ids"]]
            if max(lengths) > self.context:
                raise ApiError(400, f"a text has {max(lengths)} tokens, more than the model's {self.context} "
                               "positions. Fix: shorten it", param="text", code="context_length_exceeded")
            return self.model.classify(texts, pairs), sum(lengths)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _require_generator(self) -> None:
        if self.kind == CLASSIFIER:
            raise ApiError(404, f"{self.folder.name} is a classifier: it does not generate. Fix: use "
                           "POST /v1/classify", code="not_a_generator")


def _is_classifier(folder: Path) -> bool:
    """A plain export of a sequence classifier: its config.json names a *ForSequenceClassification architecture."""
    path = folder / "config.json"
    if not path.is_file():
        return False
    architectures = read_json(path, ModelError, "export the model again").get("architectures") or []
    return any(str(a).endswith("ForSequenceClassification") for a in architectures)


def _positions(folder: Path) -> int:
    from lamda_edge.runtime.generate import _context_length

    return _context_length(folder, folder / "merged")
