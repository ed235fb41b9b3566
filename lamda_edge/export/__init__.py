"""Ship a trained adapter: merge -> ONNX graphs -> quantization -> validation against PyTorch -> genai packaging.

    merged.py    the base rebuilt as trained, the adapter merged, a plain transformers folder written
    graph.py     torch.onnx.export of a decoder with a KV cache, or of an encoder classifier
    seq2seq.py   an encoder-decoder (BART): encoder, decoder and decoder-with-past graphs, validated
    quantize.py  weight-only int4 of the merged graph (MatMulNBits)
    nf4.py       the unmerged graph: NF4 residual (MatMulBnb4 with bitsandbytes' codes) or int4/int8 residual + LaMDA
    lowbit.py    `--int4` / `--int8`: which low-bit graph, built how, checked against what
    validate.py  PyTorch vs ONNX Runtime, every output, every mismatch listed
    genai.py     the onnxruntime-genai builder route; genai_pack.py: our own validated graph packaged for genai
    gguf_file.py `--format gguf`: the merged model as one GGUF file (gguf_vocab.py: its tokenizer metadata),
                 gguf_check.py: read back with transformers and checked; modelfile.py: Ollama's Modelfile
    peft_lora.py `--format peft`: the adapter as a standard PEFT LoRA on the original base; peft_check.py checks it
                 with real PEFT (logits against ours, merge_and_unload against our merge)
    pipeline.py  `export(ExportOptions)`: all of the above, built in a temporary folder and renamed into place
    location.py  where an export may write (never onto, around or into the adapter, the model, the cwd); no torch
    ship.py      what the device needs of an export folder (its default graph, config, tokenizer); `--ship DIR`
"""

from lamda_edge.lazy import lazy_names

# public name -> the module that defines it (loaded on first use: `location` is checked before torch loads)
_LAZY = {"ExportOptions": "pipeline", "export": "pipeline"}

__getattr__, __dir__ = lazy_names(__name__, {name: f"{__name__}.{module}" for name, module in _LAZY.items()})

__all__ = sorted(_LAZY)
