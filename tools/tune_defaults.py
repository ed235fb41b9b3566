"""Tune LaMDA's defaults by measurement: LaMDA settings against PEFT LoRA at its best learning rate, at equal steps.

Usage (each stage appends one JSON line per run to --out; --report turns the records into tables, CSV and a plot):
    .venv/bin/python tools/tune_defaults.py --quick --out /tmp/tune-quick.jsonl --plot /tmp/tune-quick.png
    .venv/bin/python tools/tune_defaults.py --stage lora-lr --tasks spam --rank 16 --out docs/results/tune/runs.jsonl
    .venv/bin/python tools/tune_defaults.py --stage grid --tasks spam --rank 16 --steps 30 --out ...
    .venv/bin/python tools/tune_defaults.py --stage compare --tasks spam products --rank 16 --seeds 0 1 2 --out ...
    .venv/bin/python tools/tune_defaults.py --stage ranks --tasks spam --ranks 8 16 32 64 --out ...
    .venv/bin/python tools/tune_defaults.py --stage inits --tasks products --inits random minor \\
        --variants default s8-b0.1 --seeds 0 1 2 --schedule linear --out ...
    .venv/bin/python tools/tune_defaults.py --report docs/results/tune/runs.jsonl \\
        --csv docs/results/tune/summary.csv --markdown docs/results/tune/summary.md \\
        --plot docs/results/tune/rank_curve.png

Stages (tasks and their training loop are tools/bench_quality.py's: spam with all-MiniLM-L6-v2, and the
generative reasoning-gym tasks `products` (multiplication, exact match) and `legs` (leg counting) with
SmolLM2-135M, plus moby and gsm):
  lora-lr  PEFT LoRA over a small learning-rate grid (LORA_LRS); its best rate is "LoRA at its best".
  grid     LaMDA over per-group learning rates (S and B multipliers), t_i fraction, alpha (2r, and rsLoRA's scale
           alpha/sqrt(r): s = 2 sqrt(r)) and init (principal, principal plus a small random part of S), at the
           base lr of the task, over `--seeds`; short runs (`--steps`).
  compare  LoRA at its best lr (from the records in --out; the lora-lr grid is run first when there are none),
           LaMDA at the paper's settings (one rate, t_i 30%, alpha 2r), LaMDA and LaMDA++ at the current
           defaults, over `--seeds`.
  ranks    LaMDA at the defaults at each of `--ranks`, and LoRA at its best lr at the same ranks: the
           accuracy-vs-trainable-parameters curve.
  inits    LaMDA's init (`--inits`: principal, minor, random, random-residual) crossed with rate variants
           (`--variants`: "default" and "s<S>-b<B>"; default: "default"), over `--seeds`, and LoRA at its best lr
           on the same seeds (`--methods lamda lamda++`: LaMDA++ too, as "lamda++-init-<init>"). Variant names are
           "init-<init>" at the default rates, "init-<init>-s<S>-b<B>" otherwise ("-nf4" added with
           `--quantize nf4`). Runs the records already hold are not run again: the principal init at the default
           rates is the compare stage's "lamda" run, at a rate variant the grid stage's run of that name, and LoRA
           the compare or ranks stage's "lora-best" run (the record is copied under the inits stage, marked
           "reused").

The score is the task's metric: accuracy (spam), held-out answer loss (generative tasks; exact match is
recorded too) or perplexity (moby). `--quick` runs every stage on spam with tiny settings (a smoke test).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402
import bench_quality as bq  # noqa: E402

STAGES = ("lora-lr", "grid", "compare", "ranks", "inits")
INITS = ("principal", "minor", "random", "random-residual")  # lamda_edge.adapters.config.INITS
LORA_LRS = (3e-4, 1e-3, 3e-3)
PAPER = {"s_lr_scale": 1.0, "b_lr_scale": 1.0}  # one learning rate for S and B, as in the paper
NOISE = 0.01  # "principal+noise": S += NOISE * rms(S) * N(0, 1), seeded


def rate_variant(s: float, b: float) -> dict:
    """The grid variant "s<S>-b<B>": S's and B's learning rates at S x and B x the base rate."""
    return dict(name=f"s{s:g}-b{b:g}", options={"s_lr_scale": float(s), "b_lr_scale": float(b)})


def grid_variants(rank: int, quick: bool, names: list[str] | None = None) -> list[dict]:
    """The LaMDA settings the grid stage tries: per-group rates first, then t_i, alpha and init at the default.

    A name of the form "s<S>-b<B>" in `names` that the grid lacks (e.g. "s32-b0.1") is added as that rate variant,
    one of the form "default-t<f>" (e.g. "default-t1": B trains to the end) as that t_i fraction,
    "energy-t<f>" as LaMDA++ (energy-based ranks) at that t_i fraction, "<init>-t<f>" (e.g. "random-t0.8") as that
    init at that t_i, and any of these followed by "-s<S>-b<B>" (e.g. "default-t0.8-s8-b0.1") at those rates, or by
    "-x<k>" (e.g. "energy-t0.8-x0.35") with S's and B's default rates times k (`LaMDAConfig.rate_scale`, what
    `lamda-edge train` sets for a small batch; per layer rank for LaMDA++).
    """
    rs_alpha = 2.0 * math.sqrt(rank) * rank  # s = alpha / r = 2 sqrt(r): rsLoRA's alpha / sqrt(r) with alpha = 2r
    if quick:
        return [dict(name="paper", options=PAPER), dict(name="default", options={})]
    variants = [rate_variant(s, b) for s in (1, 4, 16, 64) for b in (0.25, 1)]
    variants += [dict(name=f"default-t{f:g}", options={"freeze_b_fraction": f}) for f in (0.1, 0.6)]
    variants += [dict(name="default-rsalpha", options={"alpha": rs_alpha}),
                 dict(name="paper-rsalpha", options={**PAPER, "alpha": rs_alpha}),
                 dict(name="default-noise", options={}, noise=NOISE)]
    known = {v["name"] for v in variants}
    for name in names or []:
        match = re.fullmatch(r"s([0-9.]+)-b([0-9.]+)", name)
        if match and name not in known:
            variants.append(rate_variant(float(match[1]), float(match[2])))
        match = re.fullmatch(r"(default|energy|minor|random|random-residual)-t([0-9.]+)"
                             r"(?:-s([0-9.]+)-b([0-9.]+)|-x([0-9.]+))?", name)
        if match and name not in known and 0 < float(match[2]) <= 1:
            options = {"rank_allocation": "energy"} if match[1] == "energy" else {}
            if match[1] not in ("default", "energy"):
                options["init"] = match[1]
            if match[3]:
                options.update(rate_variant(float(match[3]), float(match[4]))["options"])
            if match[5]:
                options["rate_scale"] = float(match[5])
            variants.append(dict(name=name, options={**options, "freeze_b_fraction": float(match[2])}))
    return variants


def score(row: dict) -> float:
    """Higher is better: accuracy, minus the answer loss (generative), minus the perplexity."""
    if row["metric"] == "accuracy":
        return row["value"]
    if row["metric"] == "exact_match":
        return -row["answer_loss"]
    return -row["value"]


def primary(row: dict) -> tuple[str, float]:
    """(name, value) of the number a table shows for a run."""
    if row["metric"] == "exact_match":
        return "answer_loss", row["answer_loss"]
    return row["metric"], row["value"]


def settings(task: str, a) -> dict:
    """bench_quality's settings of `task` (quick or full) with the overrides given on the command line."""
    s = dict(bq.SETTINGS[task]["quick" if a.quick else "full"])
    for key in ("rank", "steps", "batch", "seq_len", "n_test", "n_train", "lr", "schedule", "quantize", "warmup",
                "max_grad_norm"):
        if getattr(a, key, None):
            s[key] = getattr(a, key)
    return s


def run(task: str, variant: str, method: str, seed: int, s: dict, cache: Path, stage: str, options: dict | None = None,
        freeze_fraction: float | None = None, noise: float = 0.0) -> dict:
    """One training run through bench_quality.run_one; `noise` adds a small random part to S's init (seeded).
    `s["quantize"]` ("nf4" or None) is the LaMDA methods' base (LoRA always trains on the float32 base)."""
    options = dict(options or {})
    fraction = options.get("freeze_b_fraction", freeze_fraction if freeze_fraction is not None else 0.3)
    row = bq.run_one(task, method, seed, s, cache, init=options.get("init", "principal"), freeze_fraction=fraction,
                     quantize=s.get("quantize"), s_noise=noise,
                     lamda_options={k: v for k, v in options.items() if k != "freeze_b_fraction"} or None)
    if method in bc.LAMDA_METHODS:
        from lamda_edge import LaMDAConfig

        cfg = LaMDAConfig(rank=s["rank"], **{k: v for k, v in options.items() if k != "alpha"})
        row.update(s_lr_mult=cfg.s_lr_multiplier(), b_lr_mult=cfg.b_lr_multiplier(),
                   alpha=options.get("alpha", 2.0 * s["rank"]))
    row.update(variant=variant, stage=stage, options=options, noise=noise, freeze_fraction=fraction,
               quantize=s.get("quantize") if method in bc.LAMDA_METHODS else None)
    return row


# ---- stages -------------------------------------------------------------------------------------------------------


def read_rows(path: str | None) -> list[dict]:
    if not path or not Path(path).is_file():
        return []
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if "error" not in r and "variant" in r]


def schedule_of(row: dict) -> str:
    """A record's learning-rate schedule (records before the `schedule` field were constant-rate runs), with its
    warmup and gradient clipping when it had them: "linear", "linear, warmup 3, gradient norm clipped at 1"."""
    extras = ([f"warmup {row['warmup']}"] if row.get("warmup") else []) + (
        [f"gradient norm clipped at {row['max_grad_norm']:g}"] if row.get("max_grad_norm") else [])
    return ", ".join([row.get("schedule") or "constant", *extras])


def best_lora_lr(rows: list[dict], task: str, rank: int, steps: int, schedule: str | None = None) -> float | None:
    """The LoRA learning rate of the lora-lr stage with the best mean score for (task, rank, steps, schedule)."""
    by_lr: dict[float, list] = {}
    for r in rows:
        if (r["stage"] == "lora-lr" and r["task"] == task and r["rank"] == rank and r["steps"] == steps
                and schedule_of(r) == (schedule or "constant")):
            by_lr.setdefault(r["lr"], []).append(score(r))
    if not by_lr:
        return None
    return max(by_lr, key=lambda lr: statistics.fmean(by_lr[lr]))


def jobs_for(stage: str, task: str, a, rows: list[dict]) -> list[dict]:
    """The runs of `stage` on `task` (LoRA's best lr is looked up in `rows` when the stage needs it)."""
    s = settings(task, a)
    lora_lrs = a.lora_lrs[:2] if a.quick else a.lora_lrs
    if stage == "lora-lr":
        return [dict(task=task, variant=f"lora-lr{lr:g}", method="lora", seed=sd, s={**s, "lr": lr}, stage=stage)
                for lr in lora_lrs for sd in a.seeds[:1]]
    if stage == "grid":
        return [dict(task=task, variant=v["name"], method="lamda", seed=sd, s=s, stage=stage,
                     options=v["options"], noise=v.get("noise", 0.0))
                for sd in a.seeds for v in grid_variants(s["rank"], a.quick, a.variants)
                if not a.variants or v["name"] in a.variants]
    ranks = a.ranks if stage == "ranks" else [s["rank"]]
    jobs = []
    for rank in ranks:
        sr = {**s, "rank": rank}
        lr = (a.lora_lr or best_lora_lr(rows, task, rank, s["steps"], s.get("schedule"))
              or best_lora_lr(rows, task, s["rank"], s["steps"], s.get("schedule")))
        if lr is None:
            raise SystemExit(f"no lora-lr records for {task} at rank {rank}, {s['steps']} steps in {a.out}: "
                             "run --stage lora-lr first (or use --stage compare, which runs it)")
        seeds = a.seeds if stage == "compare" else a.seeds[:1]
        for sd in seeds:
            jobs.append(dict(task=task, variant="lora-best", method="lora", seed=sd, s={**sr, "lr": lr}, stage=stage))
            if stage == "compare":
                jobs.append(dict(task=task, variant="lamda-paper", method="lamda", seed=sd, s=sr, stage=stage,
                                 options=PAPER))
            jobs.append(dict(task=task, variant="lamda", method="lamda", seed=sd, s=sr, stage=stage, options={}))
            if stage == "compare":
                jobs.append(dict(task=task, variant="lamda++", method="lamda++", seed=sd, s=sr, stage=stage,
                                 options={}))
    return [job for job in jobs if not a.variants or job["variant"] in a.variants]


def init_jobs(task: str, a, rows: list[dict]) -> list[dict]:
    """The inits stage: every init of `--inits` at every rate variant of `--variants` ("default" or "s<S>-b<B>"),
    and LoRA at its best lr, over `--seeds`. Each job names the records that already hold its run (`same_as`)."""
    s = settings(task, a)
    lr = a.lora_lr or best_lora_lr(rows, task, s["rank"], s["steps"], s.get("schedule"))
    if lr is None:
        raise SystemExit(f"no lora-lr records for {task} at rank {s['rank']}, {s['steps']} steps in {a.out}: "
                         "run --stage lora-lr first")
    jobs = []
    for sd in a.seeds:
        jobs.append(dict(task=task, variant="lora-best", method="lora", seed=sd, s={**s, "lr": lr}, stage="inits",
                         same_as=[("compare", "lora-best"), ("ranks", "lora-best")]))
        for rates in a.variants or ["default"]:
            # the records of other stages that hold the principal init's run, per method (fp32 base only)
            if rates == "default":
                options, same_as = {}, {"lamda": [("compare", "lamda")], "lamda++": [("compare", "lamda++")]}
            else:
                match = re.fullmatch(r"s([0-9.]+)-b([0-9.]+)", rates)
                if match is None:
                    raise SystemExit(f"--variants {rates!r}: the inits stage takes 'default' or 's<S>-b<B>' "
                                     "(e.g. s8-b0.1)")
                options = rate_variant(float(match[1]), float(match[2]))["options"]
                same_as = {"lamda": [("grid", rates)], "lamda++": []}
            for method in a.methods:
                for init in a.inits:
                    name = ("" if method == "lamda" else "lamda++-") + f"init-{init}" + (
                        "" if rates == "default" else f"-{rates}") + ("-nf4" if s.get("quantize") else "")
                    reuse = same_as[method] if init == "principal" and not s.get("quantize") else []
                    jobs.append(dict(task=task, variant=name, method=method, seed=sd, s=s, stage="inits",
                                     options={**options, "init": init}, same_as=reuse))
    return jobs


def run_stage(stage: str, a, cache: Path) -> list[dict]:
    out = []
    for task in a.tasks:
        rows = read_rows(a.out) + out
        s = settings(task, a)
        needs_lora_lr = stage in ("compare", "ranks", "inits") and not a.lora_lr
        if needs_lora_lr and best_lora_lr(rows, task, s["rank"], s["steps"], s.get("schedule")) is None:
            out += _run_jobs(jobs_for("lora-lr", task, a, rows), a, cache)
            rows = read_rows(a.out) + out
        jobs = init_jobs(task, a, rows) if stage == "inits" else jobs_for(stage, task, a, rows)
        out += _run_jobs(jobs, a, cache, rows)
    return out


def _recorded(job: dict, rows: list[dict]) -> dict | None:
    """A run already in the records is not run again: the same stage, task, variant, seed and settings (then
    None is returned and nothing is appended). LoRA at its best lr is a run of the lora-lr grid when the seed matches:
    that record is reused under the job's stage, as is a record of a (stage, variant) in the job's `same_as`."""
    s = job["s"]
    keys = ("rank", "steps", "batch", "seq_len", "n_test", "lr", "quantize")  # warmup, clipping: in schedule_of
    for r in rows:
        if ("error" not in r and (r["stage"], r["task"], r["variant"], r["seed"]) == (
                job["stage"], job["task"], job["variant"], job["seed"]) and _same_settings(r, s, keys)):
            return {**r, "already_recorded": True}
    for stage, variant in job.get("same_as", ()):
        for r in rows:
            if ("error" not in r and (r["stage"], r["task"], r["variant"], r["seed"]) == (
                    stage, job["task"], variant, job["seed"]) and _same_settings(r, s, keys)):
                return {**r, "variant": job["variant"], "stage": job["stage"], "reused": f"{stage}/{variant}"}
    if job["variant"] != "lora-best":
        return None
    for r in rows:
        if (r["stage"] == "lora-lr" and r["task"] == job["task"] and r["seed"] == job["seed"]
                and _same_settings(r, s, ("rank", "steps", "lr"))):
            return {**r, "variant": "lora-best", "stage": job["stage"], "reused": "lora-lr"}
    return None


def _same_settings(record: dict, s: dict, keys: tuple[str, ...]) -> bool:
    """Whether a run's record has the settings `s` at `keys`, and the same schedule (records before the
    `schedule` field were constant-rate runs)."""
    return all(record.get(k) == s.get(k) for k in keys) and schedule_of(record) == schedule_of(s)


def _run_jobs(jobs: list[dict], a, cache: Path, rows: list[dict] = ()) -> list[dict]:
    done = []
    for job in jobs:
        t0 = time.perf_counter()
        try:
            row = _recorded(job, [*rows, *done]) or run(cache=cache, **{k: v for k, v in job.items()
                                                                       if k != "same_as"})
        except Exception as exc:  # record and go on: one failing run must not lose the others
            row = {k: v for k, v in job.items() if k not in ("s", "same_as")} | {
                "error": f"{type(exc).__name__}: {exc}"[:1000]}
        if row.get("already_recorded"):
            print(f"already recorded: {job['stage']} {job['task']} {job['variant']} seed {job['seed']}", flush=True)
            done.append(row)
            continue
        row["mode"] = "quick" if a.quick else "full"
        row["wall_seconds"] = time.perf_counter() - t0
        print(json.dumps(row), flush=True)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            with open(a.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        if "error" not in row:
            done.append(row)
    return done


# ---- report -------------------------------------------------------------------------------------------------------


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (stage, task, steps, schedule, rank, variant): mean and spread of the score over seeds."""
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["stage"], r["task"], r["steps"], schedule_of(r), r["rank"], r["variant"]), []).append(r)
    out = []
    for (stage, task, steps, schedule, rank, variant), runs in groups.items():
        runs = list({r["seed"]: r for r in runs}.values())  # a rerun of a seed counts once, the last wins
        name = primary(runs[0])[0]
        vals = [primary(r)[1] for r in runs]
        line = {"stage": stage, "task": task, "steps": steps, "schedule": schedule, "rank": rank, "variant": variant,
                "method": runs[0]["method"], "lr": runs[0]["lr"], "metric": name, "mean": statistics.fmean(vals),
                "median": statistics.median(vals),
                "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0, "min": min(vals), "max": max(vals),
                "seeds": " ".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"])),
                "trainable_start": runs[0]["trainable_start"], "trainable_end": runs[0]["trainable_end"],
                "s_lr_mult": runs[0].get("s_lr_mult"), "b_lr_mult": runs[0].get("b_lr_mult")}
        if runs[0]["metric"] == "exact_match":
            line["exact_match"] = statistics.fmean(r["value"] for r in runs)
        out.append(line)
    return out


def markdown(lines: list[dict]) -> str:
    text = []
    for key in dict.fromkeys((x["stage"], x["task"], x["steps"], x["schedule"]) for x in lines):
        stage, task, steps, schedule = key
        part = [x for x in lines if (x["stage"], x["task"], x["steps"], x["schedule"]) == key]
        better_low = part[0]["metric"] != "accuracy"
        part.sort(key=lambda x: (x["rank"], x["mean"] if better_low else -x["mean"]))
        text += [f"### {stage}: {task}, {steps} steps{_schedule_words(schedule)} ({part[0]['metric']}, "
                 f"{'lower' if better_low else 'higher'} is better)", "",
                 "| variant | rank | lr | S x | B x | trainable start | end | seeds | mean | sd | min-max | exact |",
                 "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|"]
        for x in part:
            fmt = "{:.1%}" if x["metric"] == "accuracy" else "{:.3f}"
            exact = f"{x['exact_match']:.1%}" if "exact_match" in x else "-"
            text.append(f"| {x['variant']} | {x['rank']} | {x['lr']:g} | {_mult(x['s_lr_mult'])} | "
                        f"{_mult(x['b_lr_mult'])} | {x['trainable_start']:,} | {x['trainable_end']:,} | "
                        f"{x['seeds']} | "
                        f"{fmt.format(x['mean'])} | {fmt.format(x['sd'])} | "
                        f"{fmt.format(x['min'])}-{fmt.format(x['max'])} | {exact} |")
        text.append("")
    return "\n".join(text)


def rate_matrix(lines: list[dict]) -> str:
    """Per task and rank, LaMDA's runs by learning rates as one table: a row per S multiplier, a column per B's.

    The grid's "s<S>-b<B>" variants and the compare and ranks stages' LaMDA runs (defaults, the paper's single
    rate, ...) at t_i 30%, alpha 2r and the principal init; where two share a cell, the one with more seeds."""
    text = []
    grid = [x for x in lines if (x["stage"] == "grid" and re.fullmatch(r"s[0-9.]+-b[0-9.]+", x["variant"]))
            or (x["stage"] in ("compare", "ranks") and x["method"] == "lamda")]
    for group in dict.fromkeys((x["task"], x["rank"], x["steps"], x["schedule"]) for x in grid):
        task, rank, steps, schedule = group
        part: dict[tuple, dict] = {}
        for x in grid:
            key = (x["s_lr_mult"], x["b_lr_mult"])
            if (x["task"], x["rank"], x["steps"], x["schedule"]) == group and (
                    key not in part or len(x["seeds"].split()) > len(part[key]["seeds"].split())):
                part[key] = x
        if len(part) < 2:
            continue
        s_values, b_values = sorted({k[0] for k in part}), sorted({k[1] for k in part})
        metric = next(iter(part.values()))["metric"]
        fmt = "{:.1%}" if metric == "accuracy" else "{:.3f}"
        text += [f"### rates: {task}, rank {rank}, {steps} steps{_schedule_words(schedule)} ({metric}; "
                 "mean over the seeds run, their number in brackets)", "",
                 "| S x \\ B x | " + " | ".join(f"{b:g}" for b in b_values) + " |",
                 "|---:|" + "---:|" * len(b_values)]
        for sv in s_values:
            cells = [f"{fmt.format(part[sv, b]['mean'])} ({len(part[sv, b]['seeds'].split())})"
                     if (sv, b) in part else "" for b in b_values]
            text.append(f"| {sv:g} | " + " | ".join(cells) + " |")
        text.append("")
    return "\n".join(text)


def _schedule_words(schedule: str) -> str:
    """How a table heading names the schedule: nothing for the constant rate (the benchmark's default)."""
    rate, _, extras = schedule.partition(", ")  # "linear, warmup 3" -> ", linear schedule, warmup 3"
    return ("" if rate == "constant" else f", {rate} schedule") + (f", {extras}" if extras else "")


def _mult(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def plot(lines: list[dict], path: str) -> None:
    """Score against trainable parameters (at the end of the run), LaMDA per rank and LoRA, one panel per task that
    has more than one rank; the median over seeds (one diverged seed does not drag the point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [x for x in lines if x["stage"] in ("ranks", "compare") and x["variant"] in ("lamda", "lora-best")]
    panels = [key for key in dict.fromkeys((x["task"], x["schedule"]) for x in pts)
              if len({x["rank"] for x in pts if (x["task"], x["schedule"]) == key}) > 1]
    if not panels:
        raise SystemExit("no ranks/compare records to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (task, schedule) in zip(axes[0], panels):
        for variant, style in (("lamda", "o-"), ("lora-best", "s--")):
            ours = sorted({x["rank"]: x for x in pts if (x["task"], x["schedule"], x["variant"]) == (
                task, schedule, variant)}.values(), key=lambda x: x["trainable_end"])
            if not ours:
                continue
            ax.plot([x["trainable_end"] for x in ours], [x["median"] for x in ours], style,
                    label="LaMDA (defaults), after t_i" if variant == "lamda" else "LoRA at its best lr")
            for x in ours:
                ax.annotate(f"r{x['rank']}", (x["trainable_end"], x["median"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (end of run)")
        ax.set_ylabel(next(x["metric"] for x in pts if x["task"] == task) + " (median over seeds)")
        ax.set_title(task + _schedule_words(schedule))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(files: list[str], a) -> int:
    rows = [r for f in files for r in read_rows(f)]
    lines = summarize(rows)
    text = markdown(lines) + "\n" + rate_matrix(lines)
    print(text)
    if a.markdown:
        bc.write_atomic(a.markdown, text + "\n")
    if a.csv:
        Path(a.csv).parent.mkdir(parents=True, exist_ok=True)
        fields = list(dict.fromkeys(k for x in lines for k in x))
        with open(a.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(lines)
    if a.plot:
        plot(lines, a.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every stage on spam with tiny settings (a smoke test)")
    p.add_argument("--stage", nargs="+", default=["compare"], choices=STAGES)
    p.add_argument("--tasks", nargs="+", default=["spam"], choices=sorted(bq.SETTINGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="seeds of the grid and compare stages (lora-lr and ranks use the first)")
    p.add_argument("--rank", type=int, default=16, help="rank of the lora-lr, grid and compare stages")
    p.add_argument("--ranks", nargs="+", type=int, default=[8, 16, 32, 64], help="ranks of the ranks stage")
    p.add_argument("--steps", type=int, default=None, help="override the task's training steps")
    p.add_argument("--batch", type=int, default=None, help="override the task's batch size")
    p.add_argument("--seq-len", type=int, default=None, help="override the task's sequence length")
    p.add_argument("--n-test", type=int, default=None, help="override the task's test examples")
    p.add_argument("--n-train", type=int, default=None, help="override the task's training examples")
    p.add_argument("--schedule", choices=["constant", "linear"], default=None,
                   help="learning-rate schedule of every run: constant (the benchmark's default) or linear decay to "
                        "0, as `lamda-edge train` runs (the report keeps the two apart)")
    p.add_argument("--warmup", type=int, default=None,
                   help="with --schedule linear: steps of linear warmup before the decay (transformers' schedule; the "
                        "records say `warmup`; `lamda-edge train` has warmup_steps 0 by default)")
    p.add_argument("--max-grad-norm", type=float, default=None,
                   help="clip the gradient's norm at this value before each step, as transformers' Trainer (so "
                        "`lamda-edge train`) does at 1.0; the benchmark's default is no clipping")
    p.add_argument("--quantize", choices=["nf4"], default=None,
                   help="train the LaMDA runs on an NF4 base (the residual in bitsandbytes 4-bit, as `lamda-edge "
                        "train --quantize nf4`); the records say `quantize`, and the report keeps them apart")
    p.add_argument("--lr", type=float, default=None,
                   help="override the task's base learning rate (LaMDA's; LoRA's comes from the lora-lr grid)")
    p.add_argument("--variants", nargs="+", default=None,
                   help="only these variants (compare/ranks: lora-best, lamda-paper, lamda, lamda++; grid: its names; "
                        "inits: the rates, 'default' or 's<S>-b<B>')")
    p.add_argument("--inits", nargs="+", default=["principal", "random"], choices=INITS,
                   help="the inits stage's inits (LaMDAConfig.init)")
    p.add_argument("--methods", nargs="+", default=["lamda"], choices=["lamda", "lamda++"],
                   help="the inits stage's methods: LaMDA, and LaMDA++ (energy-based ranks) with each init")
    p.add_argument("--lora-lrs", nargs="+", type=float, default=list(LORA_LRS), help="the lora-lr stage's grid")
    p.add_argument("--lora-lr", type=float, default=None,
                   help="LoRA's rate for the compare, ranks and inits stages, instead of the lora-lr grid's best "
                        "(e.g. the best rate of the short runs, for runs at 10x the steps)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "lamda-edge" / "bench-data"))
    p.add_argument("--out", default=None, help="append each run as a JSON line (and read LoRA's best lr from it)")
    p.add_argument("--report", nargs="+", default=None, metavar="JSONL", help="run nothing: tables of these records")
    p.add_argument("--markdown", default=None, help="write the tables to this file")
    p.add_argument("--csv", default=None, help="write the summary lines to this CSV file")
    p.add_argument("--plot", default=None, help="write the score-vs-trainable-parameters plot (PNG) here")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = its default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.report:
        return report(a.report, a)
    if a.quick:
        a.tasks, a.seeds, a.rank, a.ranks = ["spam"], a.seeds[:1], 4, [2, 4]
        a.stage = list(STAGES)
    print(json.dumps({"machine": bc.machine_info(), "stages": a.stage}), flush=True)
    rows = []
    for stage in a.stage:
        rows += run_stage(stage, a, Path(a.cache))
    if a.out:
        return report([a.out], a)
    lines = summarize(rows)
    print(markdown(lines))
    if a.plot:
        plot(lines, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
