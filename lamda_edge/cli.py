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
    pass


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
                       "  lamda-edge plan --device cpu --model smollm2-135m --json --measure")
    p.set_defaults(run=_run_plan)


def _run_plan(args) -> int:
    raise LamdaEdgeError("`lamda-edge plan` is not available yet")


# ---- train ---------------------------------------------------------------------------------------------------------


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with LaMDA on a 4-bit base", formatter_class=_Formatter,
                       epilog="examples:\n  lamda-edge train\n  lamda-edge train --config run.yaml max_steps=200")
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    raise LamdaEdgeError("`lamda-edge train` is not available yet")


# ---- export --------------------------------------------------------------------------------------------------------


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="merge the adapter and export to ONNX", formatter_class=_Formatter,
                       epilog="example:\n  lamda-edge export --adapter runs/demo --output runs/demo-onnx --int4")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    raise LamdaEdgeError("`lamda-edge export` is not available yet")


# ---- generate ------------------------------------------------------------------------------------------------------


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with an exported ONNX model", formatter_class=_Formatter,
                       epilog="example:\n  lamda-edge generate --model runs/demo-onnx --prompt 'What is 12 * 7?'")
    p.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    raise LamdaEdgeError("`lamda-edge generate` is not available yet")


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


if __name__ == "__main__":
    sys.exit(main())
