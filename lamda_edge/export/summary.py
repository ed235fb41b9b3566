"""The export's verdict at a glance: the `summary` that leads export-report.json and that the CLI prints.

    report (validation cases, per-tensor parity, timings, ...) ──> summary: ok, what each graph is and how it was
                                                                   checked, max |diff| per output, sizes,
                                                                   perplexities, greedy-token agreement

A graph is either checked for equality with PyTorch (the fp32/fp16 graph, int4 as trained, a genai package of
our graph) or re-quantized (int4 merged or nbits, int8, the genai builder's int4/fp16): a re-quantized graph is
never called equal; it carries its measured agreement and must pass the quality floor of `validate.py`.
"""

from __future__ import annotations

from lamda_edge.export.graph import MODEL_FILE
from lamda_edge.runtime.session import DEFAULT_GRAPHS


def summarize(report: dict) -> dict:
    """The short summary of a (finished or failed) export report."""
    validation = report.get("validation") or {}
    diffs = validation.get("max_abs_diff") or {}
    summary = {"ok": bool(report.get("ok")), "kind": report.get("kind"),
               "max_abs_diff": _max_diff_per_output(diffs) or _genai_diff(validation),
               "sizes_mb": {name: round(size / 1e6, 2) for name, size in (report.get("sizes_bytes") or {}).items()},
               "graphs": _graphs(report)}
    ppl = _perplexities(_parts(report))
    if ppl:
        summary["perplexity"] = ppl
    agreement = {key: value for part in _parts(report) for key, value in part.items()
                 if key.startswith(("greedy_agreement_", "agreement_", "greedy_match"))}
    if agreement:
        summary["token_agreement"] = agreement
    problems = list(validation.get("mismatches") or [])
    for part in _parts(report):
        problems += [m for m in part.get("mismatches", []) if m not in problems]
        problems += [m for m in (part.get("parity") or {}).get("mismatches", []) if m not in problems]
    if problems:
        summary["problems"] = problems
    summary["generate_uses"] = _generate_uses(report)
    if report.get("kind") == "encoder":
        summary["classify_uses"] = _default_graph(report)
    if report.get("ship"):
        summary["ship"] = {"files": report["ship"]["files"], "mb": round(report["ship"]["bytes"] / 1e6, 2)}
    return summary


def with_summary_first(report: dict) -> dict:
    """The report with `summary` as its first key (the details after it)."""
    rest = {k: v for k, v in report.items() if k != "summary"}
    return {"summary": summarize(rest), **rest}


def summary_lines(summary: dict) -> list[str]:
    """The summary as the lines `lamda-edge export` prints."""
    lines = [f"export {'ok' if summary['ok'] else 'FAILED'} ({summary.get('kind') or 'model'})"]
    for name, graph in summary["graphs"].items():
        size = summary["sizes_mb"].get(name)
        lines.append(f"  {name}{f' ({size:.1f} MB)' if size is not None else ''}: {graph['check']}")
    if summary.get("max_abs_diff"):
        diffs = summary["max_abs_diff"].items()
        lines.append("  max |diff| vs PyTorch: " + ", ".join(f"{k} {v:.3g}" for k, v in diffs))
    if summary.get("perplexity"):
        ppl = summary["perplexity"].items()
        lines.append("  held-out perplexity: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl))
    if summary.get("token_agreement"):
        what = "class (argmax) agreement" if summary.get("kind") == "encoder" else "greedy-token agreement"
        lines.append(f"  {what}: " + ", ".join(
            f"{k} {_fmt_agreement(v)}" for k, v in summary["token_agreement"].items()))
    for problem in summary.get("problems", []):
        lines.append(f"  problem: {problem}")
    if summary.get("generate_uses"):
        lines.append(f"  `lamda-edge generate` uses {summary['generate_uses']} by default (--onnx-file to choose)")
    if summary.get("classify_uses"):
        lines.append(f"  `lamda-edge classify` uses {summary['classify_uses']} by default (--onnx-file to choose)")
    if summary.get("ship"):
        lines.append(f"  the device needs only {', '.join(summary['ship']['files'])} ({summary['ship']['mb']:.1f} MB; "
                     "`export --ship DIR` copies exactly these)")
    return lines


def _fmt_agreement(value) -> str:
    """A yes/no as yes/no, a count (greedy_matching_prefix: tokens equal before the first difference) as tokens, a
    share (greedy_agreement_*, agreement_*: 0..1) as a percentage."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value} tokens"
    return f"{value:.0%}"


def _parts(report: dict) -> list[dict]:
    """The sections that carry quality numbers: low-bit graphs, the genai package or build."""
    parts = [report[key] for key in ("int4", "int8", "genai") if isinstance(report.get(key), dict)]
    validation = report.get("validation") or {}
    if "precision" in validation:  # the genai builder's validation holds its own numbers
        parts.append(validation)
    return parts


def _perplexities(parts: list[dict]) -> dict:
    """{graph: held-out perplexity} over the parts; a part measured on another number of tokens (the genai package
    reads the first 64) keeps its own values, named with that number: "pytorch (64 tokens)" beside "pytorch"."""
    ppl, first = {}, None
    for part in parts:
        values = {key.removeprefix("ppl_"): value for key, value in part.items() if key.startswith("ppl_")}
        if not values:
            continue
        tokens = part.get("held_out_tokens")
        first = tokens if first is None else first
        suffix = "" if tokens == first else f" ({tokens} tokens)"
        for key, value in values.items():
            ppl.setdefault(key + suffix, value)
    return ppl


def _max_diff_per_output(diffs: dict) -> dict:
    """{logits, present (the largest over every present.N.key/value)} from the per-output maxima."""
    out = {k: v for k, v in diffs.items() if not k.startswith("present.")}
    present = [v for k, v in diffs.items() if k.startswith("present.")]
    if present:
        out["present"] = max(present)
    return out


def _genai_diff(validation: dict) -> dict:
    return {"logits": validation["max_abs_logit_diff"]} if "max_abs_logit_diff" in validation else {}


def _graphs(report: dict) -> dict:
    """{graph file: {"check": what it was checked against, in words}}."""
    graphs = {}
    if isinstance(report.get("peft"), dict):  # --format peft: one adapter file, checked with real PEFT
        return {"adapter_model.safetensors": {"check": report["peft"].get("check", "")}}
    validation = report.get("validation") or {}
    if "precision" in validation:  # onnxruntime-genai's builder
        graphs[validation.get("graph", "model.onnx")] = {"check": validation.get("check", "")}
        return graphs
    if validation.get("cases") is not None:
        tol = validation.get("tolerance") or {}
        verdict = "equal to PyTorch" if not validation.get("mismatches") else "DIFFERS from PyTorch"
        if report.get("kind") == "seq2seq":  # encoder, decoder, decoder with past (export/seq2seq.py)
            for name in report.get("sizes_bytes") or {}:
                graphs[name] = {"check": f"{verdict} (atol {tol.get('atol')}, rtol {tol.get('rtol')}, every output, "
                                         "two batch/source/target shapes)"}
            return graphs
        cases = "two batch/length shapes" if report.get("kind") == "encoder" else "prefill/decode/chunk"
        graphs[MODEL_FILE] = {"check": f"{verdict} (atol {tol.get('atol')}, rtol {tol.get('rtol')}, every output, "
                                       f"{cases})"}
    for key in ("int4", "int8"):
        part = report.get(key)
        if isinstance(part, dict):
            graphs[part["file"]] = {"check": part.get("check", ""), "method": part.get("method")}
    genai = report.get("genai")
    if isinstance(genai, dict):
        graphs.setdefault(genai["graph"], {"check": ""})
        graphs[genai["graph"]]["genai"] = ("onnxruntime-genai's greedy tokens equal `lamda-edge generate`'s"
                                           if genai.get("greedy_match") else "onnxruntime-genai DIFFERS")
    return graphs


def _generate_uses(report: dict) -> str | None:
    if report.get("kind") != "decoder":
        return None
    genai = report.get("genai") or {}
    if genai.get("graph"):
        return f"{genai['graph']} (through onnxruntime-genai: the folder holds genai_config.json)"
    return _default_graph(report)


def _default_graph(report: dict) -> str | None:
    """The graph of the folder that `generate` / `classify` run when not told (runtime/session.py's order)."""
    files = set(report.get("sizes_bytes") or {})
    return next((name for name in DEFAULT_GRAPHS if name in files), None)
