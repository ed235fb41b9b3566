"""`lamda-edge`: the command line, a thin layer over the library.

    plan ──> load (4-bit base) ──> adapt (LaMDA) ──> train ──> merge ──> export (ONNX) ──> generate / classify

Each subcommand has an `_add_<name>` (`_subcommand`: its help and examples, then its arguments) and a `_run_<name>`
(one or two calls into the library). `train`'s flags come from the run config's one table (`cli_flags`), added when
`train` is parsed; `devices` and `plan` (without --config or --measure) are arithmetic and import no torch.
Exit codes: 0 ok, 2 bad input, 3 does not fit.
"""

from __future__ import annotations

import argparse
import math
import sys

from lamda_edge.errors import LamdaEdgeError

USER_HELP = """\
Fine-tune a language model with LaMDA adapters in the least memory, and ship it to a device as ONNX.

    plan ──> train ──> export (ONNX) ──> generate

A first run, on the built-in default (SmolLM2-135M-Instruct learning GSM-style word problems):

  lamda-edge train                                                    # adapter, metrics, plot in runs/demo
  lamda-edge export --adapter runs/demo --output runs/demo-onnx       # ONNX graph + parity report
  lamda-edge generate --model runs/demo-onnx --prompt "..."           # ONNX Runtime

Your own model and data: lamda-edge train --model ./my-model --data train.jsonl (.json, .csv, .parquet; Alpaca and
ShareGPT too: see `lamda-edge train --help`).
Classifiers (text/label) and encoder-decoders (source/target) train the same way (--task, else from the
model's config); an exported classifier runs with lamda-edge classify --model DIR --text "...".
Will it fit? lamda-edge plan --device rtx3060 --model llama-3.1-8b (see `lamda-edge devices`).
Each command has --help with examples. Exit codes: 0 ok, 2 bad input, 3 does not fit.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples' line breaks; shows a default only where there is one worth showing."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, where a subcommand's arguments may be added on first use (`arguments`): `train`'s flags come from
    the run config's table, whose adapter help lives in the adapter package (torch); `devices` and `plan` never
    pay for that import."""

    def __init__(self, *args, arguments=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._arguments = arguments
        self._json = False

    def parse_known_args(self, args=None, namespace=None):
        if self._arguments is not None:
            add, self._arguments = self._arguments, None
            add(self)
        argv = sys.argv[1:] if args is None else list(args)
        self._json = "--json" in argv and (self.prog.endswith(" plan") or "plan" in argv)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        """A usage error: exit 2 as argparse does; with `--json` (plan), also one JSON object on stdout."""
        if self._json:
            print(_json_error(f"{self.prog}: error: {message}", 2))
        super().error(message)


def _subcommand(sub, name: str, help: str, run, examples: list[str], **kwargs) -> argparse.ArgumentParser:
    """A subcommand's parser: its help, its examples under the arguments, `_run_<name>` to run it."""
    lines = "\n".join(f"  {example}" for example in examples)
    p = sub.add_parser(name, help=help, formatter_class=_Formatter,
                       epilog=f"example{'s' if len(examples) > 1 else ''}:\n{lines}", **kwargs)
    p.set_defaults(run=run)
    return p


# ---- devices -------------------------------------------------------------------------------------------------------


def _add_devices(sub) -> None:
    _subcommand(sub, "devices", "list the device profiles", _run_devices, ["lamda-edge devices"])


def _run_devices(args) -> int:
    from lamda_edge.planner.profiles import describe_devices

    print("\n".join(describe_devices()))
    return 0


# ---- plan ----------------------------------------------------------------------------------------------------------

# Without --config, the flags are a run config's settings (a run config built from them, `train`'s defaults for the
# rest): `plan` shows what `train` would do with the same inputs. flag -> run config key:
PLAN_RUN_FLAGS = {"device": "device", "model": "model", "seq_len": "seq_len", "rank": "lamda.rank", "batch_size":
                  "batch_size", "target_batch": "grad_accum", "quantize": "quantize", "no_quantize": "quantize",
                  "checkpointing": "gradient_checkpointing", "chunk_rows": "chunk_rows", "precision": "precision",
                  "activation_offload": "activation_offload"}
DEFAULT_PLAN_MODEL = "smollm2-135m"  # the catalogue shape of `train`'s default model


def _add_plan(sub) -> None:
    from lamda_edge.train.config import DEFAULT_BATCH_SIZE, PRECISIONS, QUANTIZE, RunConfig, field_help

    p = _subcommand(sub, "plan", "plan rank, batch size and accumulation for a device", _run_plan, [
        "lamda-edge plan  (what `lamda-edge train` would do here)",
        "lamda-edge plan --device rtx3060 --model llama-3.1-8b --seq-len 1024",
        "lamda-edge plan --device rtx3060 --model llama-3.1-8b activation_offload=true  (key=value as `train`)",
        "lamda-edge plan --device orin-nano --model qwen2.5-0.5b --json",
        "lamda-edge plan --model llama-3.1-8b --max-seq-len --activation-offload  (frontier over the GPU profiles)",
        "lamda-edge plan --device rtx3060 --device rtx4090 --model llama-3.1-8b --max-seq-len",
        "lamda-edge plan --device cpu --model smollm2-135m --json --measure",
        "lamda-edge plan --config examples/rtx3060-llama3-8b.yaml model=llama-3.1-8b  (what `train` would plan)"],
        description="Plan a training run: the flags are `train`'s settings with `train`'s defaults, so `plan` with "
        "the same inputs shows what `train` would run (base, precision, rank, batch, accumulation, checkpointing). "
        "Under the plan: the same job with PEFT QLoRA (PEFT LoRA on a float base) as PEFT's defaults run it.")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="run config settings as `train` takes them (e.g. activation_offload=true lamda.rank=16), "
                   "after the flags or --config")
    p.add_argument("--config", metavar="FILE.yaml",
                   help="plan the run of this run config as `train` plans it (its device, model, seq_len, rank, "
                   "batch_size x grad_accum, quantize, gradient_checkpointing, chunk_rows); the flags below that a "
                   "run config also holds are then given as key=value")
    run = RunConfig()
    p.add_argument("--device", action="append", help=f"{field_help('device')}, or a profile YAML file (default: "
                   f"{run.device}); with --max-seq-len it may be given several times")
    p.add_argument("--model", help=f"catalogue name (`profiles/models`), or a local folder / config.json "
                   f"(default: {DEFAULT_PLAN_MODEL}, `train`'s default model)")
    p.add_argument("--seq-len", type=int, help=f"tokens per sequence (default: {run.seq_len}, as `train`)")
    p.add_argument("--rank", type=int, help="pin the LaMDA(++) base rank (default: choose)")
    p.add_argument("--batch-size", type=int, help="pin the micro-batch (default: largest that fits)")
    p.add_argument("--target-batch", type=int, help=f"effective batch reached with grad_accum (default: batch_size "
                   f"x grad_accum as `train`: {DEFAULT_BATCH_SIZE} x {run.grad_accum})")
    p.add_argument("--quantize", choices=QUANTIZE, help=f"{field_help('quantize')} (default: {run.quantize})")
    p.add_argument("--no-quantize", action="store_true", default=None, help="the same as --quantize none")
    p.add_argument("--checkpointing", choices=("auto", "on", "off"),
                   help="gradient checkpointing (default auto: off when the same batch fits without it)")
    p.add_argument("--activation-offload", action="store_true", default=None,
                   help=field_help("activation_offload"))
    p.add_argument("--max-seq-len", action="store_true",
                   help="print the longest seq_len that fits at batch 1 (the long-context frontier) with the other "
                   "options, for each --device, or for every GPU profile when no --device is given")
    p.add_argument("--chunk-rows", type=int, help=f"rows per chunk of the loss; 0 = full logits "
                   f"(default: {run.chunk_rows})")
    p.add_argument("--dataset-tokens", type=int, default=10_000_000, help="tokens per epoch, for the time estimate")
    p.add_argument("--precision", choices=PRECISIONS, help=f"compute dtype: {field_help('precision')} (default: "
                   f"{run.precision}; the plan reads bf16 support from the device profile)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--measure", action="store_true",
                   help="run real training steps of the plan on this machine and report the measured peak "
                   "(on a CPU, pin a small --batch-size/--seq-len to keep it quick)")
    p.add_argument("--measure-steps", type=int, default=2, help="steps to run with --measure (first one warms up)")


def _run_plan(args) -> int:
    import json

    from lamda_edge.planner.compare import compare_with_peft
    from lamda_edge.planner.report import format_plan
    from lamda_edge.planner.search import plan

    try:
        if args.max_seq_len:
            return _run_frontier(args)
        if args.device and len(args.device) > 1:
            from lamda_edge.errors import ConfigError

            raise ConfigError(f"--device is given {len(args.device)} times; only --max-seq-len compares devices. "
                              "Fix: give one --device, or add --max-seq-len")
        device, model, request = _plan_request(args)
        result = plan(device, model, **request, dataset_tokens=args.dataset_tokens)
        result.compare = compare_with_peft(result)  # the same job with PEFT LoRA / QLoRA (issue 27)
        if args.measure:
            from lamda_edge.planner.measure import measure_plan

            result.measured = measure_plan(result, steps=args.measure_steps)
    except LamdaEdgeError as exc:  # scripts read stdout: --json answers with an object on every exit
        if args.json:
            print(_json_error(str(exc), exc.exit_code, getattr(exc, "details", None)))
        raise
    print(json.dumps(result.to_json(), indent=2) if args.json else format_plan(result))
    return 0 if result.fits else 3


def _run_frontier(args) -> int:
    """`plan --max-seq-len`: the longest context at batch 1 on each device (the frontier table, or --json)."""
    import json
    from argparse import Namespace

    from lamda_edge.planner.profiles import load_devices
    from lamda_edge.planner.report import format_frontier
    from lamda_edge.planner.search import max_seq_len

    if args.measure:
        from lamda_edge.errors import ConfigError

        raise ConfigError("--max-seq-len with --measure: the frontier is arithmetic. Fix: plan one --seq-len with "
                          "--measure")
    names = args.device or [d.name for d in sorted(load_devices().values(), key=lambda d: d.usable_bytes)
                            if d.kind == "cuda"]
    rows = []
    for name in names:
        device, model, request = _plan_request(Namespace(**{**vars(args), "device": [name]}))
        same = dict(rank=request["rank"] or 16, quantize=request["quantize"],
                    gradient_checkpointing=request["gradient_checkpointing"] is not False,
                    chunk_rows=request["chunk_rows"], compute_dtype=request["compute_dtype"],
                    activation_offload=request["activation_offload"])
        rows.append({"device": device.name, "total_bytes": device.total_bytes, "usable_bytes": device.usable_bytes,
                     "max_seq_len": max_seq_len(device, model, **same),
                     "peft_max_seq_len": max_seq_len(device, model, **same, method="lora")})  # issue 27
    options = {"model": model.name, "batch_size": 1, "rank": min(request["rank"] or 16, _max_rank(model)),
               "quantize": request["quantize"],
               "gradient_checkpointing": request["gradient_checkpointing"] is not False,
               "activation_offload": bool(request["activation_offload"]), "chunk_rows": request["chunk_rows"]}
    print(json.dumps({**options, "frontier": rows}, indent=2) if args.json else format_frontier(options, rows))
    return 0 if all(r["max_seq_len"] for r in rows) else 3


def _max_rank(model) -> int:
    from lamda_edge.planner.search import max_rank

    return max_rank(model)


def _plan_flags(args) -> tuple[dict, list[str]]:
    """The run config settings the plan flags give (as flags of `train` would), and key=value overrides."""
    flags = {"device": args.device[-1] if args.device else None, "model": args.model, "seq_len": args.seq_len,
             "batch_size": args.batch_size, "activation_offload": args.activation_offload,
             "quantize": "none" if args.no_quantize else args.quantize, "precision": args.precision,
             "chunk_rows": args.chunk_rows, "rank": args.rank,  # `rank`: train's --rank, an alias of lamda.rank
             "gradient_checkpointing": {None: None, "auto": None, "on": True, "off": False}[args.checkpointing]}
    overrides = []
    if args.chunk_rows == 0:  # 0 = full logits: the run config's null
        flags["chunk_rows"], overrides = None, overrides + ["chunk_rows=null"]
    return flags, overrides


def _json_error(message: str, exit_code: int, details: dict | None = None) -> str:
    """`plan --json`'s object when there is no plan: `fits` false, the error, the exit code, and for exit 3 what
    was tried and the smallest change that fits (`smallest_change`, `changes`)."""
    import json

    return json.dumps({"fits": False, "error": message, "exit_code": exit_code, **(details or {})}, indent=2)


def _plan_request(args):
    """(device profile, model shape, the planner's arguments), as `train` asks the planner for the same run: from a
    run config built from the flags (train's defaults for the rest), or from --config."""
    from lamda_edge.errors import ConfigError
    from lamda_edge.load.device import resolve_quantize
    from lamda_edge.planner import get_device, get_model
    from lamda_edge.train.config import load_run_config

    if args.config is None:  # as `train`: the flags, then key=value (later wins), with train's validation
        flags, overrides = _plan_flags(args)
        config = load_run_config(None, flags, overrides + args.overrides)
    else:
        given = [flag for flag in PLAN_RUN_FLAGS if getattr(args, flag) is not None]
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} with --config: the run config holds that setting. "
                              f"Fix: give it as key=value after the file (e.g. {PLAN_RUN_FLAGS[given[0]]}=...)")
        config = load_run_config(args.config, None, args.overrides)
    device = get_device(config.planner_device())
    quantize = resolve_quantize(config.quantize, "cpu" if device.kind == "cpu" else "cuda")
    request = config.plan_arguments(quantize)
    if args.config is None and args.target_batch is not None:
        request["target_batch"] = args.target_batch
    return device, get_model(config.model or DEFAULT_PLAN_MODEL), request


# ---- train ---------------------------------------------------------------------------------------------------------


def _add_train(sub) -> None:
    _subcommand(
        sub, "train", "fine-tune with LaMDA (NF4 base on CUDA, full precision on a CPU)", _run_train, [
            "lamda-edge train", "lamda-edge train --config run.yaml max_steps=200",
            "lamda-edge train --model ./my-model --data train.jsonl --output runs/mine --rank 16 lr=5e-4 "
            "lamda.init=minor",
            "lamda-edge train --model ./my-model --data alpaca_data.json  (ShareGPT .json/.jsonl, .csv, .parquet too)",
            "lamda-edge train --output runs/mine --resume",
            "lamda-edge train --config examples/cpu-default.yaml  (more in examples/)",
            "accelerate launch --num_processes 2 -m lamda_edge.cli train --data train.jsonl  (docs/multi-gpu.md)"],
        arguments=_train_arguments,
        description="Fine-tune with LaMDA. Settings come from --config YAML, then the flags, then key=value pairs "
        "(later wins); any run config key can be given as key=value, the adapter's as lamda.<key>=value. Output "
        "folder: the adapter, run_config.yaml, metrics.json, loss_curve.png and checkpoints/.")


def _train_arguments(p) -> None:
    """`train`'s arguments: the run config's flags, from its one table (`cli_flags`)."""
    from lamda_edge.train.config import cli_flags

    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="run config overrides, e.g. max_steps=200 lamda.rank=16")
    p.add_argument("--config", metavar="FILE.yaml", help="run config YAML file")
    for flag, key, kind, text in cli_flags():
        if kind is bool:  # a switch: given = true, absent = the config's value
            p.add_argument(flag, dest=key, action="store_true", default=None, help=text)
        else:
            p.add_argument(flag, dest=key, type=kind, default=None, help=text)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its newest checkpoint (exactly, as if never stopped)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def _run_train(args) -> int:
    from lamda_edge.train.config import cli_flags, load_run_config
    from lamda_edge.train.recipe import train
    from lamda_edge.train.report import RUN_CONFIG_NAME

    flags = {key: getattr(args, key) for _, key, _, _ in cli_flags()}
    config = load_run_config(args.config, flags, args.overrides)
    saved = config.output_dir() / RUN_CONFIG_NAME
    if args.resume and args.config is None and saved.is_file():  # resume with the run's own (resolved) config
        config = load_run_config(saved, flags, args.overrides)
    train(config, resume=args.resume, progress=not args.quiet)
    return 0


# ---- export --------------------------------------------------------------------------------------------------------


def _add_export(sub) -> None:
    p = _subcommand(sub, "export", "merge the adapter and export to ONNX", _run_export, [
        "lamda-edge export --adapter runs/demo --output runs/demo-onnx --int8   # a full-precision-trained adapter",
        "lamda-edge export --adapter runs/demo --output runs/demo-onnx --int8 --ship runs/demo-ship",
        "lamda-edge export --adapter runs/nf4 --output runs/nf4-onnx --int4     # trained with --quantize nf4",
        "lamda-edge export --adapter runs/demo --output runs/demo-genai --format genai   # int8 here, int4 after nf4",
        "lamda-edge export --adapter runs/demo --output runs/demo-gguf --format gguf --gguf-type q8_0  # llama.cpp",
        "lamda-edge export --adapter runs/demo --output runs/demo-peft --format peft   # PEFT / vLLM LoRA adapter",
        "lamda-edge export --model base-folder --output base-onnx"])
    p.add_argument("--model", help="base transformers folder, or smollm2-135m-instruct for the default model "
                   "(default: the base the adapter records, by folder, else by name); without --adapter, this model "
                   "is exported as it is")
    p.add_argument("--adapter", help="LaMDA adapter folder saved by `lamda-edge train`")
    p.add_argument("--output", required=True, help="output folder (must not exist unless --overwrite; never the "
                   "adapter or model folder, inside them, or around the current directory)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="ONNX weight type (--format onnx)")
    p.add_argument("--int4", action="store_true", help="also write model.int4.onnx: the adapter unmerged on its "
                   "4-bit residual base (see --int4-method); exactly the trained model for an adapter trained on the "
                   "NF4 base (train --quantize nf4, CUDA's default); an adapter trained on a full-precision base "
                   "can lose much of its fine-tune at 4 bits on small models: --int8 keeps it")
    p.add_argument("--int4-method", choices=("auto", "nf4", "nbits", "merged"), default="auto",
                   help="nf4: residual as NF4 (ONNX Runtime MatMulBnb4; an NF4-trained adapter exactly as trained) + "
                   "fp32 adapter path; nbits: residual as MatMulNBits int4 + fp32 adapter path; merged: merge, then "
                   "round-to-nearest int4 on every weight (before issue 11; the only one without --adapter); "
                   "auto: nf4 for an adapter, merged without one. SmolLM2-135M, 1 CPU thread, decode tokens/s "
                   "vs PyTorch eager 12.6: nf4 6.6 (ONNX Runtime's MatMulBnb4 CPU kernel is slow), nbits 29.2, "
                   "merged 39.1, --int8 26.1, fp32 graph 17.6 (docs/benchmarks.md, 'Export: int4 as trained')")
    p.add_argument("--int8", action="store_true", help="also write model.int8.onnx (residual as MatMulNBits "
                   "bits=8, adapter path fp32); not together with --int4")
    p.add_argument("--block-size", type=int, default=32, help="MatMulNBits block size (nbits, merged, --int8)")
    p.add_argument("--format", choices=("onnx", "genai", "gguf", "peft"), default="onnx",
                   help="onnx: plain graph with optimum's names; genai: the same validated graph (--precision picks "
                   "which) packaged for onnxruntime-genai (genai_config.json + tokenizer); "
                   "gguf: one model.<type>.gguf for llama.cpp / Ollama (llama, mistral, qwen2, qwen3) and a "
                   "Modelfile, read back with transformers and checked; peft: a standard LoRA adapter "
                   "(adapter_config.json, adapter_model.safetensors) on the original base for PEFT and vLLM, checked "
                   "with real PEFT (needs `pip install peft`)")
    p.add_argument("--gguf-type", choices=("f16", "q8_0", "q4_0"), default="q8_0",
                   help="--format gguf weight type: f16 (logits within 1e-3 of the merged model at f16 weights), "
                   "q8_0 (perplexity within 1%%), q4_0 (re-quantized; embedding and head stay q8_0)")
    p.add_argument("--genai-builder", action="store_true", help="--format genai: rebuild the merged folder with "
                   "onnxruntime-genai's model builder instead (its own graph; int4 re-quantizes the merged weights)")
    p.add_argument("--precision", choices=("auto", "int4", "int8", "fp16", "fp32"), default="auto",
                   help="--format genai: the graph packaged. auto follows the adapter, as train's `next:` line does: "
                   "int4 for an adapter trained on the NF4 base (train --quantize nf4), else int8 (a full-precision "
                   "base, the CPU's default; onnxruntime-genai runs it on the CPU); fp32 with --genai-builder")
    p.add_argument("--execution-provider", choices=("cpu", "cuda"), default="cpu",
                   help="--format genai target execution provider")
    p.add_argument("--eval-text", help="held-out text file for perplexity (default: a built-in paragraph)")
    p.add_argument("--ship", metavar="DIR", help="also copy exactly what the device needs into the new folder DIR: "
                   "the graph `generate` / `classify` run by default, config and tokenizer files (and "
                   "genai_config.json); the export's summary lists them with their size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (and --ship) folder")


def _run_export(args) -> int:
    from pathlib import Path

    from lamda_edge.export.location import check_output_location

    output = Path(args.output)
    model, adapter = (Path(p) if p else None for p in (args.model, args.adapter))
    check_output_location(output, adapter, model)  # before torch loads: a refusal is instant
    if args.ship:
        check_output_location(Path(args.ship), adapter, model, flag="--ship")
    from lamda_edge.export.pipeline import ExportOptions, export
    from lamda_edge.export.summary import summary_lines

    options = ExportOptions(output=output, model=model, adapter=adapter, dtype=args.dtype, int4=args.int4,
                            int4_method=args.int4_method, int8=args.int8, block_size=args.block_size,
                            format=args.format, precision=args.precision,
                            execution_provider=args.execution_provider, genai_builder=args.genai_builder,
                            overwrite=args.overwrite, eval_text=Path(args.eval_text) if args.eval_text else None,
                            gguf_type=args.gguf_type,
                            ship=Path(args.ship) if args.ship else None)
    report = export(options, progress=True)
    print("\n".join(summary_lines(report["summary"])))
    print(f"wrote {output} (report: {output / 'export-report.json'})")
    if args.ship:
        print(f"shipped {len(report['summary']['ship']['files'])} files to {args.ship}: run it there with "
              f"`lamda-edge {'classify' if report['summary'].get('kind') == 'encoder' else 'generate'} --model "
              f"{args.ship} ...`")
    return 0


# ---- generate ------------------------------------------------------------------------------------------------------


def _add_generate(sub) -> None:
    p = _subcommand(sub, "generate", "generate text with an exported ONNX model", _run_generate, [
        "lamda-edge generate --model runs/demo-onnx --task gsm --prompt 'Tom has 3 boxes of 12 pencils. He gives "
        "away 7 pencils. How many pencils does he have left?'",
        "lamda-edge generate --model runs/demo-onnx --prompt 'Hi' --onnx-file model.onnx",
        "lamda-edge generate --model runs/demo-genai --prompt 'Hi' --temperature 0.7 --top-p 0.9"],
        description="Generate with ONNX Runtime and a KV cache, streaming the text. It stops at the end-of-turn "
        "token, at --max-new-tokens, or when the same run of tokens repeats three times in a row (a greedy loop; "
        "--no-repetition-guard turns that off). Plain export folders: model.int4.onnx is used when present, else "
        "model.int8.onnx, else model.onnx (--onnx-file to choose); the last line names the graph.")
    p.add_argument("--model", required=True,
                   help="folder written by `lamda-edge export` (plain ONNX or onnxruntime-genai)")
    p.add_argument("--prompt", required=True, help="the user message (wrapped in the chat template when present)")
    p.add_argument("--task", choices=("none", "gsm"), default="none",
                   help="gsm: ask as the built-in task was trained (its system prompt) and stop once the "
                   "`#### N` answer line is complete")
    p.add_argument("--system", help="a system message before the prompt (--task gsm sets the task's own)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many new tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--onnx-file", help="plain format: which graph (default: model.int4.onnx if present, "
                   "else model.int8.onnx, else model.onnx)")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--no-repetition-guard", action="store_true",
                   help="do not stop when the output loops (the same run of tokens three times in a row)")


def _run_generate(args) -> int:
    from lamda_edge.errors import ConfigError
    from lamda_edge.runtime.generate import answer_line_stop, any_stop, load_generator, repetition_stop

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens should be positive, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ConfigError(f"--temperature should be a finite number >= 0 (0 = greedy), got {args.temperature}. "
                          "Fix: e.g. --temperature 0.7")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p should be in (0, 1], got {args.top_p}. Fix: e.g. --top-p 0.9")
    if not args.prompt.strip():
        raise ConfigError("--prompt is empty. Fix: give the text to answer, e.g. --prompt 'What is 12 * 7?'")
    system = args.system
    if args.task == "gsm" and system is None:
        from lamda_edge.demo.task import SYSTEM_PROMPT

        system = SYSTEM_PROMPT
    from lamda_edge.runtime.seq2seq import OnnxSeq2Seq, is_seq2seq_folder

    if is_seq2seq_folder(args.model):  # an encoder-decoder: the prompt is the source, greedy decoding
        if args.temperature > 0:
            raise ConfigError("an encoder-decoder generates greedily only. Fix: drop --temperature")
        s2s = OnnxSeq2Seq(args.model)
        print(s2s.generate(args.prompt, max_new_tokens=args.max_new_tokens), flush=True)
        print(f"[{s2s.onnx_file}: greedy]", file=sys.stderr)
        return 0
    gen = load_generator(args.model, onnx_file=args.onnx_file)
    stop = any_stop(answer_line_stop(gen.tokenizer) if args.task == "gsm" else None,
                    None if args.no_repetition_guard else repetition_stop)
    prompt_ids = gen.encode(args.prompt, chat=not args.no_chat_template, system=system)
    result = gen.generate("", max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed, prompt_ids=prompt_ids, stop=stop,
                          on_text=lambda piece: print(piece, end="", flush=True))
    print(flush=True)
    print(f"[{gen.onnx_file}: {result.prompt_tokens} prompt tokens, prefill {result.prefill_s * 1e3:.0f} ms; "
          f"{len(result.token_ids)} new tokens at {result.tokens_per_s:.1f} tokens/s; stopped by {result.stopped_by}]",
          file=sys.stderr)
    return 0


# ---- classify ------------------------------------------------------------------------------------------------------


def _add_classify(sub) -> None:
    p = _subcommand(sub, "classify", "classify text with an exported ONNX classifier", _run_classify, [
        "lamda-edge classify --model runs/sst-onnx --text 'a great film'",
        "lamda-edge classify --model runs/mnli-onnx --text 'A man plays.' --text-pair 'Someone plays.' --json"],
        description="Run an exported sequence classifier with ONNX Runtime: one line per text with the class name "
        "(the config's id2label, from the training labels) and its probability; the last line (stderr) names the "
        "graph: model.int4.onnx or model.int8.onnx when the export wrote one, else model.onnx.")
    p.add_argument("--model", required=True, help="folder written by `lamda-edge export` for a classifier")
    p.add_argument("--text", required=True, action="append", help="a text to classify (repeat for several)")
    p.add_argument("--text-pair", action="append", help="the second segment of a pair task (one per --text)")
    p.add_argument("--onnx-file", help="which graph (default: model.int4.onnx if present, else model.int8.onnx, "
                   "else model.onnx)")
    p.add_argument("--json", action="store_true", help="one JSON object per text instead of the table")


def _run_classify(args) -> int:
    import json
    from dataclasses import asdict

    from lamda_edge.errors import ConfigError
    from lamda_edge.runtime.classify import OnnxClassifier

    if any(not text.strip() for text in args.text):
        raise ConfigError("--text is empty. Fix: give the text to classify, e.g. --text 'a great film'")
    classifier = OnnxClassifier(args.model, onnx_file=args.onnx_file)
    for text, prediction in zip(args.text, classifier.classify(args.text, args.text_pair)):
        if args.json:
            print(json.dumps({"text": text, **asdict(prediction)}))
        else:
            print(f"{prediction.label}\t{prediction.probability:.3f}\t{text}")
    print(f"[{classifier.onnx_file}]", file=sys.stderr)
    return 0


# ---- serve ---------------------------------------------------------------------------------------------------------

API_KEY_ENV = "LAMDA_EDGE_API_KEY"


def _add_serve(sub) -> None:
    p = _subcommand(sub, "serve", "serve an export over an OpenAI-compatible HTTP API", _run_serve, [
        "lamda-edge serve --model runs/demo-onnx",
        "curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' "
        "-d '{\"messages\": [{\"role\": \"user\", \"content\": \"What is 12 * 7?\"}], \"temperature\": 0}'",
        f"{API_KEY_ENV}=secret lamda-edge serve --model runs/demo-onnx --host 0.0.0.0 --port 8080",
        "lamda-edge serve --model runs/sst-onnx  (a classifier: POST /v1/classify {\"text\": \"a great film\"})"],
        description="Serve an export folder (plain ONNX, onnxruntime-genai, an encoder-decoder or a classifier) "
        "with one shared ONNX Runtime model. Endpoints: POST /v1/chat/completions and /v1/completions (streamed or "
        "not; max_tokens, temperature, top_p, stop, seed, and vLLM's ignore_eos), GET /v1/models, GET /health, and "
        "POST /v1/classify for a classifier. At most --concurrency generations run at once and --queue wait; past "
        "that a request gets 429 with Retry-After, and past --timeout 504. SIGTERM stops taking requests, lets the "
        "running ones finish for up to --grace seconds, and exits 0. Greedy text (temperature 0) is `lamda-edge "
        "generate`'s, with the same loop guard.")
    p.add_argument("--model", required=True, help="folder written by `lamda-edge export`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (anything but loopback wants a key)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV} if set)")
    p.add_argument("--model-name", help="the model's id in the API (default: the folder's name)")
    p.add_argument("--concurrency", type=int, help="generations at once (default: the cores this process may use)")
    p.add_argument("--queue", type=int, default=32, help="requests that may wait for a slot; more get 429")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take, queue included; 504")
    p.add_argument("--grace", type=float, default=30.0, help="seconds SIGTERM waits for running requests")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads of the shared session (default: its own)")
    p.add_argument("--onnx-file", help="plain format: which graph (default: as `generate`)")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                   help="uvicorn's log level (info logs each request)")


def _run_serve(args) -> int:
    import os
    from pathlib import Path

    from lamda_edge.errors import ConfigError, require

    bounds = {"port": (0, 65535), "concurrency": (1, 1024), "queue": (0, 1 << 20), "timeout": (0.001, 1e6),
              "grace": (0, 1e6), "max_body_bytes": (1, 1 << 30), "threads": (1, 1024)}
    for name, (low, high) in bounds.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            raise ConfigError(f"--{name.replace('_', '-')} should be in [{low:g}, {high:g}], got {value}")
    require("fastapi", "serve")
    require("uvicorn", "serve")
    from lamda_edge.serve.app import ServeSettings
    from lamda_edge.serve.engine import Engine
    from lamda_edge.serve.server import serve

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    engine = Engine(args.model, onnx_file=args.onnx_file, threads=args.threads)
    settings = ServeSettings(model_name=args.model_name or Path(args.model).resolve().name, api_key=api_key,
                             concurrency=args.concurrency or cores, queue=args.queue, timeout_s=args.timeout,
                             max_body_bytes=args.max_body_bytes)
    return serve(engine, settings, args.host, args.port, args.grace, args.log_level)


# ---- main ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lamda-edge", description=USER_HELP, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_devices, _add_plan, _add_train, _add_export, _add_generate, _add_classify, _add_serve):
        add(sub)
    return parser


# the commands that run torch / ONNX Runtime on the CPU
COMPUTE_COMMANDS = ("train", "export", "generate", "classify", "serve")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse like `parse_args`, but `key=value` overrides may stand on both sides of the flags (`train a=1 --lr 1
    b=2`): argparse gives the positional list only the first run of them, the rest come back unrecognized."""
    args, rest = parser.parse_known_args(argv)
    pairs = [item for item in rest if "=" in item and not item.startswith("-")]
    if pairs and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *pairs]
        rest = [item for item in rest if item not in pairs]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}{_key_value_hint(args, rest, argv)}")
    return args


def _key_value_hint(args: argparse.Namespace, rest: list[str], argv: list[str] | None) -> str:
    """For `train --overwrite true`: how to give a run config key that has no flag (`overwrite=true`); `plan` takes
    the same key=value."""
    if getattr(args, "command", None) not in ("train", "plan"):
        return ""
    from lamda_edge.train.config import field_names, lamda_keys

    keys = set(field_names()) | set(lamda_keys())
    argv = sys.argv[1:] if argv is None else argv
    for item in rest:
        name, has_value, value = item.removeprefix("--").partition("=")
        key = name.replace("-", "_")
        if item.startswith("--") and key in keys:
            if not has_value:
                i = argv.index(item) + 1 if item in argv else len(argv)
                value = argv[i] if i < len(argv) and "=" not in argv[i] and not argv[i].startswith("-") else "VALUE"
            return f". `{name}` has no flag; give run config keys as key=value: {key}={value}"
    return ""


def main(argv: list[str] | None = None) -> int:
    from lamda_edge.files import is_user_os_error, os_error, write_failure, write_fix

    args = parse_args(build_parser(), argv)
    if args.command in COMPUTE_COMMANDS:  # before torch loads: OpenMP reads its environment once
        from lamda_edge.load.device import configure_cpu_threads
        from lamda_edge.progress import quiet_bars_off_terminal

        configure_cpu_threads()
        quiet_bars_off_terminal()
    try:
        return args.run(args)
    except LamdaEdgeError as exc:
        print(f"lamda-edge {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        sys.stderr.close()
        return 0
    except OSError as exc:  # the last resort for the user's environment (disk full, permissions): name the file
        if not is_user_os_error(exc):
            raise
        print(f"lamda-edge {args.command}: error: {os_error(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # safetensors' and torch's own error types for a failed write (the OS's words inside)
        cause = write_failure(exc)
        if cause is None:
            raise
        print(f"lamda-edge {args.command}: error: a file could not be written: {cause} ({exc}). Fix: "
              f"{write_fix(cause)}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
