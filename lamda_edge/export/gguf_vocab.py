"""The tokenizer as GGUF metadata: what llama.cpp needs to tokenize and chat exactly as transformers does.

    tokenizer.json (byte-level BPE) ──> tokenizer.ggml.model "gpt2", .pre (the pre-tokenizer's name), .tokens,
                                        .token_type (normal / control / user-defined / unused), .merges,
                                        bos / eos / unk / pad ids, add_bos / add_eos, tokenizer.chat_template

The layout follows llama.cpp's convert_hf_to_gguf.py (`get_vocab_base`, `_set_vocab_gpt2`); merges, special ids
and the chat template come from the `gguf` package's own `SpecialVocab`. llama.cpp picks its pre-tokenizer
(the regex that splits text before BPE) by name, so the name is read from tokenizer.json's structure; one that is
not in `PRE_TOKENIZERS` is refused rather than guessed (llama.cpp would silently split text differently).
SentencePiece tokenizers (Llama 2, Mistral v0.1-0.3) are not written yet.
"""

from __future__ import annotations

import json
from pathlib import Path

from lamda_edge.errors import ModelError

# llama.cpp's pre-tokenizer names, by the tokenizer.json `pre_tokenizer` that splits text the same way
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "gpt-2": "ByteLevel with GPT-2's regex (SmolLM2 as transformers converts it, GPT-2)",
    "smollm": "Digits(individual) + ByteLevel (SmolLM / SmolLM2 upstream)",
    "llama-bpe": "Split(Llama 3's regex) + ByteLevel",
    "qwen2": "Split(Qwen2's regex) + ByteLevel",
}


def pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json `pre_tokenizer`, or None when it is not one we know."""
    if not pre:
        return None
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's name (llama-vocab.cpp); "gpt2" is the tokenizer *model*, and fails to load
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        return {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}.get(regex)
    return None


def read_bpe_tokenizer(folder: Path) -> tuple[dict, str]:
    """(tokenizer.json as a dict, llama.cpp's pre-tokenizer name) for a byte-level BPE tokenizer in `folder`.

    Raises:
        ModelError: no tokenizer.json, not byte-level BPE, or a pre-tokenizer llama.cpp has no name for here.
    """
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"{folder} has no tokenizer.json; a GGUF file carries the tokenizer. Fix: save the base "
                         "model's fast tokenizer (tokenizer.save_pretrained) into the model folder")
    data = json.loads(path.read_text(encoding="utf-8"))
    model, decoder = data.get("model") or {}, data.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise ModelError(f"the tokenizer in {folder} is {model.get('type')} with a {decoder.get('type')} decoder; "
                         "--format gguf writes byte-level BPE tokenizers (GPT-2 style: SmolLM2, Qwen2/3, Llama 3) "
                         "only. Fix: export --format onnx, or convert with llama.cpp's convert_hf_to_gguf.py")
    name = pre_tokenizer_name(data.get("pre_tokenizer"))
    if name is None:
        found = json.dumps(data.get("pre_tokenizer"))[:200]
        raise ModelError(f"the pre-tokenizer of {folder}/tokenizer.json ({found}) is not one that llama.cpp names "
                         f"here ({', '.join(PRE_TOKENIZERS)}); llama.cpp would split text "
                         "differently from transformers. Fix: export --format onnx")
    return data, name


def token_table(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens by id, their llama.cpp token types) for `vocab_size` ids; ids the tokenizer lacks are `[PAD{i}]`."""
    import gguf

    if len(tokenizer) > vocab_size:
        raise ModelError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {vocab_size}. "
                         "Fix: resize the model's embeddings to the tokenizer (model.resize_token_embeddings)")
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def adds_special(tokenizer) -> dict[str, bool]:
    """Whether encoding text adds BOS / EOS, as transformers does it (llama.cpp's add_bos / add_eos)."""
    ids = tokenizer("a")["input_ids"]
    return {"bos": tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id],
            "eos": tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id]}


def add_tokenizer(writer, folder: Path, tokenizer, vocab_size: int) -> dict:
    """Write the tokenizer of `folder` into `writer`; return what was written (for the report)."""
    import gguf

    _, pre = read_bpe_tokenizer(folder)
    tokens, types = token_table(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ModelError(f"{folder}/tokenizer.json has no BPE merges; llama.cpp cannot tokenize without them")
    special.add_special_token = adds_special(tokenizer)  # as transformers encodes, not as the JSON guesses
    special.add_to_gguf(writer, quiet=True)
    return {"model": "gpt2", "pre": pre, "tokens": len(tokens), "merges": len(special.merges),
            "special_ids": dict(special.special_token_ids), "add_special": special.add_special_token,
            "chat_template": special.chat_template is not None}
