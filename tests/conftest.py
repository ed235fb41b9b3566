"""Shared fixtures: tiny models built from configs (no downloads) and the tolerances, defined once per dtype."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*kernels.*")
torch.set_num_threads(min(2, torch.get_num_threads()))

# Tolerances on outputs, defined once per base kind: the largest absolute difference for a float32 base, and the
# relative norm error for NF4: apply_lamda on an already-4-bit base re-quantizes the residual, one more 4-bit
# rounding of the same order as NF4's own (measured on these tiny models: 0.03-0.17 against 0.05-0.10 for NF4 vs
# float32). The 4-bit path that factors the original weights is load_lamda_model (tests/test_quant.py).
ATOL = {"fp32": 1e-4}
NF4_REL_TOL = 0.25


def assert_outputs_close(actual, expected, base: str = "fp32"):
    if base == "nf4":
        rel = float((actual - expected).norm() / expected.norm())
        assert rel <= NF4_REL_TOL, f"relative error {rel:.4f} > {NF4_REL_TOL}"
    else:
        torch.testing.assert_close(actual, expected, atol=ATOL[base], rtol=0)
VOCAB = 128


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


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


def _tiny_decoder(config_name: str, model_name: str, seed: int):
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, config_name)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return getattr(transformers, model_name)(cfg).eval()


def tiny_llama(seed: int = 0):
    return _tiny_decoder("LlamaConfig", "LlamaForCausalLM", seed)


def tiny_qwen2(seed: int = 0):
    return _tiny_decoder("Qwen2Config", "Qwen2ForCausalLM", seed)


def tiny_bert(seed: int = 0, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "bert": tiny_bert, "gpt2": tiny_gpt2}


def quantize_linears(model):
    """Replace every linear layer except the output head with an NF4 `Linear4bit` (a QLoRA-style base)."""
    from lamda_edge.adapters.bnb import quantize_nf4
    from lamda_edge.adapters.inject import HEAD_NAMES

    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in HEAD_NAMES:
            model.set_submodule(name, quantize_nf4(module.weight, module.bias, torch.float32, "cpu"))
    return model


def make_model(arch: str, base: str = "fp32", seed: int = 0):
    model = BUILDERS[arch](seed)
    return quantize_linears(model) if base == "nf4" else model


def model_output(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
