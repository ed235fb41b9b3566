"""Generation with ONNX Runtime: prefill, then one decode step per token reusing the KV cache.

    prompt ──> tokenizer (chat template) ──> prefill (T prompt tokens, P=0) ──> logits, present
                                                 └──> decode (T=1, past=present) ──> pick token ──> stream text
                                                        ^_______________________________________|

Two folder formats: the plain export of `lamda_edge.export` (model.onnx and model.int4.onnx or model.int8.onnx,
with optimum's names, tokenizer in merged/), and an onnxruntime-genai folder (told apart by genai_config.json),
whose own runtime does the loop. Token choice: greedy at temperature 0, else temperature + top-p (nucleus) sampling.

Generation stops at the end-of-turn token (EOS), at `max_new_tokens`, or when a `stop` predicate says so: the CLI
gives `answer_line_stop` (`--task gsm`: the trained `#### N` answer line is complete) and `repetition_stop` (a
guard against a loop: the same run of tokens three times in a row); neither changes which token is picked.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lamda_edge.errors import ConfigError, ModelError, require
from lamda_edge.files import read_json
from lamda_edge.runtime.decoder import OnnxDecoder
from lamda_edge.runtime.session import default_graph, session

MODEL_FILE, GENAI_CONFIG = "model.onnx", "genai_config.json"
ANSWER_LINE_RE = re.compile(r"####\s*-?[\d,]*\.?\d+[ \t]*\n")  # the built-in task's final answer line, complete
REPEATS, REPEAT_SPAN = 3, (2, 48)  # a run of 2..48 tokens seen 3 times in a row at the end is a loop


@dataclass
class GenerationResult:
    """What one `generate` call produced and how fast."""

    text: str
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)  # the new tokens only
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stopped_by: str = "max_new_tokens"  # or "eos", "stop" (the caller's `stop` predicate), "context" (the model's)

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: new tokens after the first, per second of decode steps."""
        steps = len(self.token_ids) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


# ---- the plain ONNX decoder ----------------------------------------------------------------------------------------


def pick(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Next token from logits (V,): argmax at temperature 0, else nucleus sampling at `top_p`."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs)  # most likely first
    keep = np.cumsum(probs[order]) - probs[order] < top_p  # the smallest prefix with mass >= top_p
    kept = order[keep]
    return int(rng.choice(kept, p=probs[kept] / probs[kept].sum()))


# ---- generators ----------------------------------------------------------------------------------------------------


class _Generator:
    """Shared: prompt encoding (chat template when present), stop tokens, streaming of decoded text."""

    def __init__(self, folder: Path, tokenizer_dir: Path):
        import transformers

        self.folder = folder
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        self.eos = _eos_ids(tokenizer_dir, self.tokenizer)

    def encode(self, prompt: str, chat: bool = True, system: str | None = None) -> list[int]:
        """Prompt ids; wrapped in the chat template as one user turn (after a `system` turn, if given) when the
        tokenizer has one and `chat`."""
        if chat and self.has_chat_template:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            return self.encode_messages(messages)
        return list(self.tokenizer(prompt)["input_ids"])

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """Prompt ids of a conversation (`{"role", "content"}` dicts) in the chat template, ready for the reply."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _take(self, token: int, new: list[int], result: GenerationResult, emit, ignore_eos: bool, stop) -> bool:
        """Append `token` to `new`; True (with `result.stopped_by` set) when generation ends with it, else stream the
        text so far and return False."""
        new.append(token)
        if token in self.eos and not ignore_eos:
            result.stopped_by = "eos"
        elif stop is not None and (reason := stop(new)):
            result.stopped_by = reason if isinstance(reason, str) else "stop"
        else:
            emit(new)
            return False
        return True

    def _streamer(self, on_text):
        shown = [""]

        def emit(new_ids: list[int], final: bool = False) -> str:
            text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
            if on_text and text.startswith(shown[0]) and (final or not text.endswith("\ufffd")):
                on_text(text[len(shown[0]):])
                shown[0] = text
            return text

        return emit


class OnnxGenerator(_Generator):
    """Generation with the plain ONNX export: our own prefill/decode loop over ONNX Runtime."""

    def __init__(self, folder: Path, onnx_file: str | None = None, threads: int | None = None):

        name = onnx_file or default_graph(folder) or MODEL_FILE
        if not (folder / name).is_file():
            raise ModelError(f"{folder / name} does not exist. Fix: run `lamda-edge export` into {folder}")
        tokenizer_dir = folder if (folder / "tokenizer_config.json").exists() else folder / "merged"
        super().__init__(folder, tokenizer_dir)
        self.onnx_file = name
        self.decoder = OnnxDecoder(session(folder / name, threads))
        self.context = _context_length(tokenizer_dir, folder)

    def generate(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, chat: bool = True, on_text=None, prompt_ids: list[int] | None = None,
                 ignore_eos: bool = False, stop=None):
        """Generate up to `max_new_tokens` after `prompt` (or `prompt_ids`); `on_text(str)` gets each new piece.

        `ignore_eos` runs all `max_new_tokens` steps (for benchmarks); `stop(new_ids)` ends generation after a
        token when it returns True (`stopped_by` "stop") or a reason (`stopped_by` that string).
        """
        ids = list(prompt_ids) if prompt_ids is not None else self.encode(prompt, chat)
        _check_prompt(ids, self.context)
        limit = min(max_new_tokens, self.context - len(ids))  # the model has no positions beyond its context
        rng, emit, new = np.random.default_rng(seed), self._streamer(on_text), []
        result = GenerationResult(text="", prompt_tokens=len(ids))
        if limit < max_new_tokens:
            result.stopped_by = "context"
        t = time.perf_counter()
        logits, past = self.decoder.step(np.array([ids]), self.decoder.empty_past(1))  # prefill
        result.prefill_s = time.perf_counter() - t
        t = time.perf_counter()
        while len(new) < limit:
            token = pick(logits[0, -1], temperature, top_p, rng)
            if self._take(token, new, result, emit, ignore_eos, stop):
                break
            if len(new) == limit:
                break
            logits, past = self.decoder.step(np.array([[token]]), past)  # decode: T=1, past grows by one
        result.decode_s = time.perf_counter() - t
        result.token_ids, result.text = new, emit(new, final=True)
        return result


class GenaiGenerator(_Generator):
    """Generation with an onnxruntime-genai folder: its runtime runs the loop and the KV cache."""

    def __init__(self, folder: Path, threads: int | None = None):
        self.og = require("onnxruntime_genai", "genai", package="onnxruntime-genai")
        super().__init__(folder, folder)
        genai_config = read_json(folder / GENAI_CONFIG, ModelError, "export the model again")
        self.onnx_file = genai_config["model"]["decoder"]["filename"]
        config = self.og.Config(str(folder))
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = self.og.Model(config)
        self.context = genai_config["model"].get("context_length", 4096)

    def generate(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, chat: bool = True, on_text=None, prompt_ids: list[int] | None = None,
                 ignore_eos: bool = False, stop=None):
        """Same contract as `OnnxGenerator.generate`."""
        ids = list(prompt_ids) if prompt_ids is not None else self.encode(prompt, chat)
        _check_prompt(ids, self.context)
        emit, new = self._streamer(on_text), []
        result = GenerationResult(text="", prompt_tokens=len(ids))
        params = self.og.GeneratorParams(self.model)
        options = {"max_length": min(len(ids) + max_new_tokens, self.context), "do_sample": temperature > 0}
        if ignore_eos:
            options["min_length"] = options["max_length"]
        if temperature > 0:
            options.update(temperature=temperature, top_p=top_p, top_k=0, random_seed=seed)
        params.set_search_options(**options)
        gen = self.og.Generator(self.model, params)
        t = time.perf_counter()
        gen.append_tokens(np.array(ids, dtype=np.int32))  # prefill
        result.prefill_s = time.perf_counter() - t
        t = time.perf_counter()
        while len(new) < max_new_tokens and not gen.is_done():
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            if self._take(token, new, result, emit, ignore_eos, stop):
                break
        result.decode_s = time.perf_counter() - t
        result.token_ids, result.text = new, emit(new, final=True)
        return result

    def full_logits(self, ids) -> np.ndarray:
        """Logits (T, V) for ids (1, T), one token at a time through the genai runtime (for perplexity)."""
        ids = np.asarray(ids, dtype=np.int32).reshape(-1)
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=min(len(ids) + 1, self.context), do_sample=False)
        gen = self.og.Generator(self.model, params)
        rows = []
        for token in ids:
            gen.append_tokens(np.array([token], dtype=np.int32))
            rows.append(np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1))  # (V,)
        return np.stack(rows)


def repetition_stop(new: list[int]) -> str | None:
    """'repetition' when the new tokens end in the same run of tokens REPEATS times in a row (a greedy loop)."""
    for span in range(REPEAT_SPAN[0], min(REPEAT_SPAN[1], len(new) // REPEATS) + 1):
        tail = new[-span:]
        if all(new[-span * (i + 1):len(new) - span * i] == tail for i in range(1, REPEATS)):
            return "repetition"
    return None


def answer_line_stop(tokenizer):
    """A stop predicate: 'answer' once the new text holds a complete `#### N` line (the built-in task's format)."""

    def stop(new: list[int]) -> str | None:
        text = tokenizer.decode(new[-64:], skip_special_tokens=True)
        return "answer" if ANSWER_LINE_RE.search(text) else None

    return stop


def any_stop(*stops):
    """A stop predicate that asks each of `stops` (None entries skipped) and returns the first reason."""
    stops = [s for s in stops if s is not None]

    def stop(new: list[int]):
        return next((reason for reason in (s(new) for s in stops) if reason), None)

    return stop


def load_generator(folder, onnx_file: str | None = None, threads: int | None = None):
    """An `OnnxGenerator` or, when the folder holds genai_config.json, a `GenaiGenerator`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--model {folder} is not a folder. Fix: pass the --output folder of `lamda-edge export`")
    if (folder / GENAI_CONFIG).is_file():
        return GenaiGenerator(folder, threads)
    return OnnxGenerator(folder, onnx_file, threads)


def _check_prompt(ids: list[int], context: int) -> None:
    if not ids:
        raise ConfigError("the prompt is empty (no tokens). Fix: give a prompt, or keep the chat template on")
    if len(ids) >= context:
        raise ConfigError(f"the prompt has {len(ids)} tokens, but the model's context is {context} positions, which "
                          "leaves none to generate. Fix: shorten the prompt")


def _context_length(*folders: Path) -> int:
    """The model's positions (`max_position_embeddings`, GPT-2's `n_positions`) from the first config.json found;
    a very large number when none says (the graph then bounds nothing, and only --max-new-tokens stops)."""
    for folder in folders:
        path = folder / "config.json"
        if path.is_file():
            config = read_json(path, ModelError, "export the model again")
            for key in ("max_position_embeddings", "n_positions"):
                if isinstance(config.get(key), int) and config[key] > 0:
                    return config[key]
    return 2**31 - 1


def _eos_ids(folder: Path, tokenizer) -> set[int]:
    ids = set()
    for name in ("generation_config.json", "config.json", "genai_config.json"):
        path = folder / name
        if path.is_file():
            data = read_json(path, ModelError, "export the model again")
            value = data.get("eos_token_id", data.get("model", {}).get("eos_token_id"))
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
