"""Shared fixtures: tiny models built from configs (no downloads), their tokenizer, and the tolerances.

Test modules never import each other nor this file: what they share comes through fixtures.

- `tiny`: the one set of builders (`tiny.model`, `tiny.save`, `tiny.tokenizer`, `tiny.output`), by architecture.
- `tol`: the tolerances, defined once per dtype / base kind.
- `tiny_run`: a training run's inputs (a tiny Llama folder, a JSONL data file).
- `run_export`: the export pipeline with its log silenced.
- `ids`: a (2, 12) batch of token ids below `tiny.VOCAB`.
"""

from __future__ import annotations

import copy
import json
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*kernels.*")
# pytest-xdist runs one worker per core (pyproject's addopts): each worker then gets its share of the cores, so the
# workers' BLAS threads do not fight over them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

VOCAB = 128


@dataclass(frozen=True)
class Tolerances:
    """Tolerances on outputs, defined once per dtype / base kind.

    `nf4` is the relative norm error of outputs on a 4-bit base: apply_lamda on an already-4-bit base re-quantizes
    the residual, one more 4-bit rounding of the same order as NF4's own (measured on these tiny models: 0.03-0.17
    against 0.05-0.10 for NF4 vs float32). The 4-bit path that factors the original weights, load_lamda_model, is
    held to the same bound against the float32 in-memory path (tests/test_quant.py).
    """

    fp32: float = 1e-4  # largest |difference| of float32 outputs (logits, presents) computed two ways
    fp16: float = 3e-2  # the same for a float16 model (ONNX fp16 export)
    nf4: float = 0.25  # relative norm error of outputs on an NF4 base
    # losses and gradients in fp32 (sums of a few hundred terms), and a loss computed from bf16 inputs
    fp32_loss: dict = field(default_factory=lambda: {"atol": 1e-5, "rtol": 1e-4})
    bf16_loss: dict = field(default_factory=lambda: {"atol": 5e-2, "rtol": 2e-2})

    def assert_outputs_close(self, actual, expected, base: str = "fp32"):
        if base == "nf4":
            rel = float((actual - expected).norm() / expected.norm())
            assert rel <= self.nf4, f"relative error {rel:.4f} > {self.nf4}"
        else:
            torch.testing.assert_close(actual, expected, atol=getattr(self, base), rtol=0)


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The corpus of the tokenizer that `tiny.save` gives a model folder by default.
SENTENCES = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
             "what is twelve times seven? it is eighty four.", "water boils at one hundred degrees."]

# arch -> (config class, model class) in transformers
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "bert": ("BertConfig", "BertForSequenceClassification"),
    "bert-encoder": ("BertConfig", "BertModel"),  # a bare encoder, no head (MiniLM's case)
    "deberta-v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification"),  # v3's layout: relative attention
    "deberta-v2-encoder": ("DebertaV2Config", "DebertaV2Model"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "bart": ("BartConfig", "BartForConditionalGeneration"),
}
DECODERS_WITH_KV_HEADS = ("llama", "qwen2", "gemma2", "phi3", "mistral", "qwen3")


def chatml_tokenizer(corpus: list[str], vocab_size: int = 300):
    """A byte-level BPE tokenizer trained here on `corpus` (never downloaded), with a ChatML chat template.

    Special tokens: <pad> (padding), <|im_start|>, <|im_end|> (end of turn and EOS).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<pad>")
    tok.chat_template = CHATML
    return tok


def tiny_config(arch: str, vocab: int = VOCAB, hidden: int = 64, intermediate: int | None = None, layers: int = 2,
                positions: int = 64, **extra):
    """The config of a tiny `arch` model: `hidden` wide, `layers` deep, 4 heads (2 key/value heads for decoders).

    `intermediate` defaults to 2 * hidden (GPT-2: its own 4 * hidden); `extra` goes to the config as is.
    """
    import transformers

    config_cls = getattr(transformers, ARCHS[arch][0])
    if arch == "gpt2":
        shape = dict(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=positions)
        if intermediate is not None:
            shape["n_inner"] = intermediate
        return config_cls(**shape, **extra)
    if arch == "bart":
        shape = dict(vocab_size=vocab, d_model=hidden, encoder_layers=layers, decoder_layers=layers,
                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=intermediate or 2 * hidden,
                     decoder_ffn_dim=intermediate or 2 * hidden, max_position_embeddings=positions)
        return config_cls(**{**shape, **extra})
    shape = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                 num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=positions)
    if arch in DECODERS_WITH_KV_HEADS:
        shape["num_key_value_heads"] = 2
    if arch == "phi3":  # its default pad id (32000) lies outside a tiny vocabulary
        shape["pad_token_id"] = 0
    if arch == "gemma2":  # every other layer slides over a window shorter than the tests' sequences
        shape.update(head_dim=hidden // 4, sliding_window=4, query_pre_attn_scalar=hidden // 4)
    if arch.startswith("deberta-v2"):  # DeBERTa-v3's attention: relative positions, content<->position terms
        shape.update(relative_attention=True, pos_att_type=["p2c", "c2p"], position_biased_input=False,
                     max_relative_positions=-1, position_buckets=8, norm_rel_ebd="layer_norm", share_att_key=True)
    if arch in ("bert", "deberta-v2"):
        shape["num_labels"] = 3
    return config_cls(**{**shape, **extra})


def quantize_linears(model):
    """Replace every linear layer except the output head with an NF4 `Linear4bit` (a QLoRA-style base)."""
    from lamda_edge.adapters.bnb import quantize_nf4
    from lamda_edge.adapters.inject import HEAD_NAMES

    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in HEAD_NAMES:
            model.set_submodule(name, quantize_nf4(module.weight, module.bias, torch.float32, "cpu"))
    return model


class TinyModels:
    """The builders of tiny models, tokenizers and model folders, by architecture (handed out by `tiny`).

    `model()` builds each (arch, base, seed, shape) once per session and hands out deep copies: a copy has the
    weights a fresh build would have, and the global RNG is left where a fresh build would leave it. The kept
    originals never run a forward pass (an eval forward may repack 4-bit weights on CPU; see DESIGN.md).
    """

    VOCAB = VOCAB
    CHATML = CHATML
    config = staticmethod(tiny_config)
    tokenizer = staticmethod(chatml_tokenizer)

    def __init__(self):
        self._built: dict = {}

    def model(self, arch: str = "llama", base: str = "fp32", seed: int = 0, **shape):
        """A tiny randomly initialized `arch` model in eval mode, seeded with `seed`; `base="nf4"`: NF4 linears.

        `shape`: `tiny_config`'s arguments (vocab, hidden, intermediate, layers, positions, config fields).
        """
        key = (arch, base, seed, tuple(sorted(shape.items())))
        if key not in self._built:
            import transformers

            if base == "nf4":
                model = quantize_linears(self.model(arch, "fp32", seed, **shape))
                self._built[key] = (model, torch.get_rng_state())
            else:
                config = tiny_config(arch, **shape)
                torch.manual_seed(seed)
                model = getattr(transformers, ARCHS[arch][1])(config).eval()
                self._built[key] = (model, torch.get_rng_state())
        model, rng = self._built[key]
        torch.set_rng_state(rng)
        return copy.deepcopy(model)

    @staticmethod
    def for_tokenizer(arch: str, tokenizer) -> dict:
        """Config fields that size a model of `arch` to `tokenizer`: vocab and its special token ids."""
        if arch == "gpt2":
            return {"vocab": len(tokenizer)}
        fields = {"vocab": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
        if arch in DECODERS_WITH_KV_HEADS:
            fields.update(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        if arch == "bart":  # the decoder starts from EOS, as BART's own checkpoints do
            eos = tokenizer.eos_token_id
            fields.update(eos_token_id=eos, bos_token_id=eos, decoder_start_token_id=eos, forced_eos_token_id=eos)
        return fields

    def save(self, folder, arch: str = "llama", seed: int = 0, tokenizer=None, tie: bool = False, **shape):
        """Write a tiny `arch` model sized to `tokenizer` (default: one trained on SENTENCES) and the tokenizer.

        The model has 256 positions unless `shape` says otherwise; `tie`: lm_head shares the embedding.
        Returns the model.
        """
        tokenizer = tokenizer if tokenizer is not None else chatml_tokenizer(SENTENCES * 3, vocab_size=300)
        shape = {"positions": 256, **self.for_tokenizer(arch, tokenizer), **shape}
        if tie:
            shape["tie_word_embeddings"] = True
        model = self.model(arch, seed=seed, **shape)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return model

    @staticmethod
    def output(model, ids):
        with torch.no_grad():
            return model(input_ids=ids).logits

    @staticmethod
    def move(model, seed: int = 0, s_scale: float = 0.5, b_scale: float = 0.5):
        """Move every LaMDA layer's S and B away from their init, as training would (S may start at 0: without this
        a merge or export check proves nothing); returns the model."""
        from lamda_edge.adapters import lamda_layers

        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in lamda_layers(model):
                layer.lamda_S.add_(s_scale * torch.randn(layer.lamda_S.shape, generator=g))
                layer.lamda_B.add_(b_scale * torch.randn(layer.lamda_B.shape, generator=g))
        return model


class TinyRun:
    """A training run's inputs (handed out by `tiny_run`): a tiny Llama folder and a JSONL file of rows drawn from
    WORDS."""

    WORDS = "the cat sat on the mat and a dog ran to the park what is two plus three answer five seven".split()

    def __init__(self, tiny: TinyModels):
        self.tiny = tiny

    def model_dir(self, folder: Path, seed: int = 0) -> Path:
        """A tiny Llama (hidden 32, 2 layers) with a byte-level BPE tokenizer (vocab < 512), saved as a folder."""
        tokenizer = chatml_tokenizer([" ".join(self.WORDS)] * 5, vocab_size=300)
        self.tiny.save(folder, "llama", seed, tokenizer=tokenizer, hidden=32, positions=128)
        return folder

    @staticmethod
    def env(**extra: str) -> dict:
        """Environment for a subprocess that runs a script by path: `extra`, and this checkout first on PYTHONPATH.

        `python -m lamda_edge.cli` from the repository root imports this checkout's lamda_edge, but a script run by
        path imports whatever lamda_edge is installed, which need not be this checkout (another worktree's editable
        install): then the two halves of one test would run different code.
        """
        repo = str(Path(__file__).resolve().parents[1])
        path = os.environ.get("PYTHONPATH")
        return {"PYTHONPATH": repo + os.pathsep + path if path else repo, **extra}

    def data(self, path: Path, n: int = 48, seed: int = 0) -> Path:
        """`n` prompt/completion rows of random WORDS, seeded."""
        rng = random.Random(seed)
        rows = [{"prompt": " ".join(rng.choices(self.WORDS, k=6)),
                 "completion": " " + " ".join(rng.choices(self.WORDS, k=5))} for _ in range(n)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path


@pytest.fixture(scope="session")
def tiny() -> TinyModels:
    return TinyModels()


@pytest.fixture(scope="session")
def tiny_run(tiny) -> TinyRun:
    return TinyRun(tiny)


@pytest.fixture(scope="session")
def tol() -> Tolerances:
    return Tolerances()


@pytest.fixture
def private_cache(tmp_path_factory, monkeypatch):
    """load_lamda_model's prepared-layer cache goes to the session's temp folder, not the user's ~/.cache (a module
    that loads models says `pytestmark = pytest.mark.usefixtures("private_cache")`)."""
    monkeypatch.setenv("LAMDA_EDGE_CACHE", str(tmp_path_factory.getbasetemp() / "lamda-edge-cache"))


@pytest.fixture(scope="session")
def run_export():
    """`run_export(output, **options)`: the export pipeline (ExportOptions fields), its log silenced."""

    def run(output, **kw):
        from lamda_edge.export.pipeline import ExportOptions, export

        return export(ExportOptions(output=output, **kw), log=lambda *_: None)

    return run


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
