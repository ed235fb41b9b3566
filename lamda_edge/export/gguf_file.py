"""The merged model as one GGUF file for llama.cpp, Ollama and LM Studio, written with the `gguf` package.

    merged model (fp32) ──> per tensor: HF name ──gguf.get_tensor_name_map──> GGUF name (blk.N.attn_q.weight, ...)
                            llama / mistral: q_proj, k_proj rows permuted to llama.cpp's rotary layout
                            1-D (norms, biases): F32; 2-D: F16, or gguf.quants' Q8_0 / Q4_0 blocks of 32
         + hyperparameters (llama.* / qwen2.* / qwen3.* keys) + tokenizer (export/gguf_vocab.py)
                        ──> model.<type>.gguf (written atomically)

The conventions follow llama.cpp's convert_hf_to_gguf.py (LlamaModel, Qwen2Model, Qwen3Model): the rotary
permutation groups each head's two halves the way llama.cpp's "normal" rope mode pairs them (transformers' GGUF
reader undoes it); a tied output head is not written (llama.cpp reuses token_embd). Q4_0 keeps the embedding and
the output head at Q8_0, as llama.cpp's own low-bit types keep those two tensors above the rest. A row whose length
is not a multiple of 32 cannot be blocked and stays F16.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lamda_edge.atomic import write_atomic
from lamda_edge.errors import ModelError, require
from lamda_edge.export.gguf_vocab import add_tokenizer

GGUF_TYPES = ("f16", "q8_0", "q4_0")
BLOCK = 32  # Q8_0 / Q4_0 block length along a row


@dataclass(frozen=True)
class Family:
    """How one transformers model_type is written: the GGUF architecture and whether q/k rows are permuted."""

    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool


FAMILIES = {
    "llama": Family("LLAMA", True),
    "mistral": Family("LLAMA", True),  # llama.cpp runs Mistral as llama (as convert_hf_to_gguf.py writes it)
    "qwen2": Family("QWEN2", False),
    "qwen3": Family("QWEN3", False),
}


def family_of(model_type: str) -> Family:
    """The `Family` of a transformers model_type; a ModelError naming the supported ones otherwise."""
    if model_type not in FAMILIES:
        raise ModelError(f"--format gguf writes {', '.join(FAMILIES)} models; this one is {model_type!r}. "
                         "Fix: export --format onnx (any family), or convert the merged folder with llama.cpp's "
                         "convert_hf_to_gguf.py")
    return FAMILIES[model_type]


def check_family(config) -> Family:
    """The `Family` of a model config (family_of), refusing a rotary embedding other than the default."""
    family = family_of(config.model_type)
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") != "default":
        raise ModelError(f"--format gguf writes the default rotary embedding; this model uses rope_type "
                         f"{rope['rope_type']!r}. Fix: export --format onnx")
    return family


def rope_parameters(config) -> dict:
    """rope_theta and rope_type from a transformers 5 (`rope_parameters`) or 4.x (`rope_theta`) config."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection (n_head * head_dim, d_in) (or its bias) from transformers' rotate-half
    layout to llama.cpp's: within each head, rows (0, d/2, 1, d/2+1, ...) become adjacent."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def tensor_type(name: str, data: np.ndarray, gguf_type: str):
    """The GGMLQuantizationType for tensor `name` (GGUF name) at `gguf_type`."""
    import gguf

    q = gguf.GGMLQuantizationType
    if data.ndim < 2:
        return q.F32
    if gguf_type == "f16" or data.shape[-1] % BLOCK:
        return q.F16
    if gguf_type == "q4_0" and not name.startswith(("token_embd.", "output.")):
        return q.Q4_0
    return q.Q8_0


def gguf_tensors(model, family: Family):
    """(GGUF name, float32 array) for every tensor of `model` the file holds, in state-dict order."""
    import gguf

    config = model.config
    arch = getattr(gguf.MODEL_ARCH, family.arch)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp uses token_embd as the output head when output.weight is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"tensor {hf_name} of this {config.model_type} model has no GGUF name in gguf's "
                             f"{family.arch} map; llama.cpp would not load it. Fix: export --format onnx")
        tensor = tensor.detach().float()
        if family.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = permute_qk(tensor, config.num_attention_heads)
        elif family.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = permute_qk(tensor, config.num_key_value_heads)
        yield name, tensor.numpy()


def add_hyperparameters(writer, config, gguf_type: str) -> None:
    """The architecture keys llama.cpp reads (context, widths, heads, norm epsilon, rope)."""
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope_parameters(config)["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:  # Qwen3 and some Llamas set head_dim apart from the width
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[gguf_type]
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(model, tokenizer_dir: Path, tokenizer, path: Path, gguf_type: str, name: str) -> dict:
    """Write `model` (a merged causal LM of a `FAMILIES` type) and its tokenizer as one GGUF file at `path`.

    Returns what was written: architecture, tokenizer summary, tensor count by GGML type, the file's size.

    Raises:
        ModelError: the family, rotary embedding or tokenizer is one the file cannot carry.
    """
    gguf = require("gguf", "gguf")
    if gguf_type not in GGUF_TYPES:
        raise ModelError(f"`gguf_type` should be one of {GGUF_TYPES}, got {gguf_type!r}")
    family = check_family(model.config)
    arch_name = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, family.arch)]
    if family.arch == "LLAMA":  # transformers (5.25) reads a llama file named "...mistral..." as a "mistral"
        name = re.sub("(?i)mistral", "", name).strip(" -_.") or "model"  # architecture gguf-py lacks, and fails
    counts: dict[str, int] = {}
    info: dict = {"architecture": arch_name, "type": gguf_type, "name": name}

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch_name)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        add_hyperparameters(writer, model.config, gguf_type)
        info["tokenizer"] = add_tokenizer(writer, Path(tokenizer_dir), tokenizer, model.config.vocab_size)
        for tensor_name, data in gguf_tensors(model, family):
            qtype = tensor_type(tensor_name, data, gguf_type)
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                writer.add_tensor(tensor_name, data.astype(np.float32 if qtype.name == "F32" else np.float16))
            else:
                writer.add_tensor(tensor_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_atomic(path, write)
    info.update(tensor_types=counts, size_bytes=Path(path).stat().st_size)
    return info
