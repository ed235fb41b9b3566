"""`lamda-edge`: the command line, a thin layer over the library.

    plan ──> load (4-bit base) ──> adapt (LaMDA) ──> train ──> merge ──> export (ONNX) ──> generate

Each subcommand has an `_add_<name>` (its arguments, with examples in the help) and a `_run_<name>`
(one or two calls into the library). Exit codes: 0 ok, 2 bad input, 3 does not fit.
"""

from __future__ import annotations

import argparse
import sys

from lamda_edge.errors import LamdaEdgeError


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples' line breaks; shows a default only where there is one worth showing."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, but bad usage exits 2 with the message only (argparse's own default is 2 as well)."""


# ---- devices -------------------------------------------------------------------------------------------------------


def _add_devices(sub) -> None:
    p = sub.add_parser("devices", help="list the device profiles", formatter_class=_Formatter,
                       epilog="example:\n  lamda-edge devices")
    p.set_defaults(run=_run_devices)


def _run_devices(args) -> int:
    from lamda_edge.planner import profiles

    for line in profiles.describe_devices():
        print(line)
    return 0


# ---- plan ----------------------------------------------------------------------------------------------------------


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="plan rank, batch size and accumulation for a device", formatter_class=_Formatter,
                       epilog="examples:\n  lamda-edge plan --device rtx3060 --model llama-3.1-8b --seq-len 1024\n"
                       "  lamda-edge plan --device orin-nano --model qwen2.5-0.5b --json\n"
                       "  lamda-edge plan --device cpu --model smollm2-135m --json --measure")
    p.add_argument("--device", default="auto", help="device profile name or alias (`lamda-edge devices`), or auto")
    p.add_argument("--model", default="smollm2-135m", help="catalogue name, or a local folder / config.json")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--rank", type=int, default=None, help="pin the LaMDA(++) base rank (default: choose)")
    p.add_argument("--batch-size", type=int, default=None, help="pin the micro-batch (default: largest that fits)")
    p.add_argument("--target-batch", type=int, default=16, help="effective batch reached with grad_accum")
    p.add_argument("--no-quantize", action="store_true", help="plan an unquantized base instead of NF4")
    p.add_argument("--checkpointing", choices=("auto", "on", "off"), default="auto",
                   help="gradient checkpointing (auto: off when the same batch fits without it)")
    p.add_argument("--chunk-rows", type=int, default=256, help="rows per chunk of the loss; 0 = full logits")
    p.add_argument("--dataset-tokens", type=int, default=10_000_000, help="tokens per epoch, for the time estimate")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="compute dtype (auto: fp32 on a CPU, bf16 on GPUs that have it, else fp16)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--measure", action="store_true",
                   help="run real training steps of the plan on this machine and report the measured peak "
                   "(on a CPU, pin a small --batch-size/--seq-len to keep it quick)")
    p.add_argument("--measure-steps", type=int, default=2, help="steps to run with --measure (first one warms up)")
    p.set_defaults(run=_run_plan)


def _run_plan(args) -> int:
    import json

    from lamda_edge.planner import get_device, get_model
    from lamda_edge.planner.report import format_plan
    from lamda_edge.planner.search import plan

    ckpt = {"auto": None, "on": True, "off": False}[args.checkpointing]
    result = plan(get_device(args.device), get_model(args.model), seq_len=args.seq_len, rank=args.rank,
                  batch_size=args.batch_size, target_batch=args.target_batch,
                  quantize=None if args.no_quantize else "nf4", gradient_checkpointing=ckpt,
                  chunk_rows=args.chunk_rows or None, dataset_tokens=args.dataset_tokens,
                  compute_dtype=None if args.precision == "auto" else args.precision)
    if args.measure:
        from lamda_edge.planner.measure import measure_plan

        result.measured = measure_plan(result, steps=args.measure_steps)
    print(json.dumps(result.to_json(), indent=2) if args.json else format_plan(result))
    return 0 if result.fits else 3


# ---- train ---------------------------------------------------------------------------------------------------------


def _add_train(sub) -> None:
    from lamda_edge.train.config import CLI_FLAGS, field_help

    p = sub.add_parser(
        "train", help="fine-tune with LaMDA on a 4-bit base", formatter_class=_Formatter,
        description="Fine-tune with LaMDA. Settings come from --config YAML, then the flags, then key=value pairs "
        "(later wins); any run config key can be given as key=value. Output folder: the adapter, run_config.yaml, "
        "metrics.json, loss_curve.png and checkpoints/.",
        epilog="examples:\n  lamda-edge train\n  lamda-edge train --config run.yaml max_steps=200\n"
        "  lamda-edge train --model ./my-model --data train.jsonl --output runs/mine --rank 16 lr=5e-4\n"
        "  lamda-edge train --output runs/mine --resume\n"
        "  accelerate launch --num_processes 2 -m lamda_edge.cli train --data train.jsonl  (docs/multi-gpu.md)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="run config overrides, e.g. max_steps=200")
    p.add_argument("--config", metavar="FILE.yaml", help="run config YAML file")
    for flag, (key, kind) in CLI_FLAGS.items():
        p.add_argument(flag, dest=key, type=kind, default=None, help=field_help(key))
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its newest checkpoint (exactly, as if never stopped)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from lamda_edge.train.config import CLI_FLAGS, load_run_config
    from lamda_edge.train.recipe import train
    from lamda_edge.train.report import RUN_CONFIG_NAME

    flags = {key: getattr(args, key) for key, _ in CLI_FLAGS.values()}
    config = load_run_config(args.config, flags, args.overrides)
    saved = config.output_dir() / RUN_CONFIG_NAME
    if args.resume and args.config is None and saved.is_file():  # resume with the run's own (resolved) config
        config = load_run_config(saved, flags, args.overrides)
    train(config, resume=args.resume, progress=not args.quiet)
    return 0


# ---- export --------------------------------------------------------------------------------------------------------


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="merge the adapter and export to ONNX", formatter_class=_Formatter,
                       epilog="examples:\n  lamda-edge export --adapter runs/demo --output runs/demo-onnx --int4\n"
                       "  lamda-edge export --adapter runs/demo --output runs/demo-genai --format genai "
                       "--precision int4\n  lamda-edge export --model base-folder --output base-onnx")
    p.add_argument("--model", help="base transformers folder (default: the one the adapter records); "
                   "without --adapter, this model is exported as it is")
    p.add_argument("--adapter", help="LaMDA adapter folder saved by `lamda-edge train`")
    p.add_argument("--output", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="ONNX weight type (--format onnx)")
    p.add_argument("--int4", action="store_true", help="also write model.int4.onnx: the adapter unmerged on its "
                   "4-bit residual base (see --int4-method)")
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
    p.add_argument("--format", choices=("onnx", "genai"), default="onnx",
                   help="onnx: plain graph with optimum's names; genai: the same validated graph (--precision picks "
                   "fp32, fp16 or int4 = --int4) packaged for onnxruntime-genai (genai_config.json + tokenizer)")
    p.add_argument("--genai-builder", action="store_true", help="--format genai: rebuild the merged folder with "
                   "onnxruntime-genai's model builder instead (its own graph; int4 re-quantizes the merged weights)")
    p.add_argument("--precision", choices=("int4", "fp16", "fp32"), default="int4", help="--format genai precision")
    p.add_argument("--execution-provider", choices=("cpu", "cuda"), default="cpu",
                   help="--format genai target execution provider")
    p.add_argument("--eval-text", help="held-out text file for perplexity (default: a built-in paragraph)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from pathlib import Path

    from lamda_edge.export.pipeline import ExportOptions, export

    output = Path(args.output)
    model, adapter = (Path(p) if p else None for p in (args.model, args.adapter))
    export(ExportOptions(output=output, model=model, adapter=adapter, dtype=args.dtype,
                         int4=args.int4, int4_method=args.int4_method, int8=args.int8,
                         block_size=args.block_size, format=args.format, precision=args.precision,
                         execution_provider=args.execution_provider, genai_builder=args.genai_builder,
                         overwrite=args.overwrite,
                         eval_text=Path(args.eval_text) if args.eval_text else None))
    print(f"wrote {output} (report: {output / 'export-report.json'})")
    return 0


# ---- generate ------------------------------------------------------------------------------------------------------


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with an exported ONNX model", formatter_class=_Formatter,
                       epilog="examples:\n  lamda-edge generate --model runs/demo-onnx --prompt 'What is 12 * 7?'\n"
                       "  lamda-edge generate --model runs/demo-genai --prompt 'Hi' --temperature 0.7 --top-p 0.9")
    p.add_argument("--model", required=True,
                   help="folder written by `lamda-edge export` (plain ONNX or onnxruntime-genai)")
    p.add_argument("--prompt", required=True, help="the user message (wrapped in the chat template when present)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many new tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--onnx-file", help="plain format: which graph (default: model.int4.onnx if present, "
                   "else model.onnx)")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    from lamda_edge.errors import ConfigError
    from lamda_edge.runtime.generate import load_generator

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens should be positive, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ConfigError(f"--temperature should be >= 0 and --top-p in (0, 1], got {args.temperature}, {args.top_p}")
    gen = load_generator(args.model, onnx_file=args.onnx_file)
    result = gen.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed, chat=not args.no_chat_template,
                          on_text=lambda piece: print(piece, end="", flush=True))
    print(flush=True)
    print(f"[{gen.onnx_file}: {result.prompt_tokens} prompt tokens, prefill {result.prefill_s * 1e3:.0f} ms; "
          f"{len(result.token_ids)} new tokens at {result.tokens_per_s:.1f} tokens/s; stopped by {result.stopped_by}]",
          file=sys.stderr)
    return 0


# ---- main ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lamda-edge", description=__doc__, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_devices, _add_plan, _add_train, _add_export, _add_generate):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
