"""Several processes: `accelerate launch` with 2 CPU processes (gloo) trains one adapter under DDP (docs/multi-gpu.md).

Both ranks train on their own shard of each batch; DDP averages the gradients, so both ranks end with the same
adapter, and the saved adapter (written by rank 0) is that adapter. B leaves training mid-run (t_i), which DDP
allows because the run sets `ddp_find_unused_parameters=True`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

DUMP = textwrap.dedent("""
    import os, sys
    from safetensors.torch import save_file
    from transformers import TrainerCallback
    from lamda_edge.adapters import lamda_layers
    from lamda_edge.cli import main
    import lamda_edge.train.recipe as t

    class Dump(TrainerCallback):  # each rank writes its own adapter at the end
        def on_train_begin(self, args, state, control, model=None, **kw):
            self.model = model.lm
        def on_train_end(self, args, state, control, **kw):
            tensors = {f"{n}.{k}": getattr(layer, k).detach().clone().contiguous()
                       for n, layer in lamda_layers(self.model) for k in ("lamda_S", "lamda_B", "lamda_B_frozen")}
            save_file(tensors, os.path.join(sys.argv[1], f"rank{args.process_index}.safetensors"),
                      metadata={"steps": str(state.global_step), "world": str(args.world_size)})

    real = t.train
    t.train = lambda config, resume=False, callbacks=None, progress=True: real(config, resume, [Dump()], progress)
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
                    reason="accelerate's launcher is not installed next to this Python")
def test_accelerate_launch_two_cpu_processes(tiny_run, tmp_path):
    from safetensors import safe_open

    model_dir = tiny_run.model_dir(tmp_path / "model")
    data_file = tiny_run.data(tmp_path / "train.jsonl", n=32)
    script = tmp_path / "dump.py"
    script.write_text(DUMP)
    out = tmp_path / "run"
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", str(script), str(tmp_path), "train", "--model", str(model_dir), "--data",
           str(data_file), "--output", str(out), "--quantize", "none", "--rank", "4", "--batch-size", "2",
           "--seq-len", "64", "--max-steps", "4", "--quiet", "save_steps=4", "freeze_b_steps=2", "lr=5e-3"]
    env = {**os.environ, **tiny_run.env(LAMDA_EDGE_CACHE=str(tmp_path / "cache")), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = []
    for i in (0, 1):
        path = tmp_path / f"rank{i}.safetensors"
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata()
        assert meta == {"steps": "4", "world": "2"}  # both ranks ran all 4 optimizer steps in a world of 2
        ranks.append({k.removeprefix("lm."): v for k, v in load_file(str(path)).items()})
    saved = load_file(str(out / "lamda_adapter.safetensors"))
    checkpoint = load_file(str(out / "checkpoints" / "checkpoint-4" / "lamda_adapter.safetensors"))
    assert ranks[0].keys() <= saved.keys()
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), f"ranks disagree on {key}: gradients were not synchronized"
        assert torch.equal(value, saved[key]), f"the saved adapter differs from rank 0's on {key}"
        assert torch.equal(value, checkpoint[key])
    assert all(int(v) == 4 for k, v in saved.items() if k.endswith("lamda_B_frozen"))  # B left training mid-run
    # the adapter moved: every S differs from its spectral init on a fresh load of the base
    from transformers import AutoModelForCausalLM

    from lamda_edge.adapters import apply_lamda, lamda_layers
    from lamda_edge.adapters.config import LaMDAConfig

    fresh = apply_lamda(AutoModelForCausalLM.from_pretrained(str(model_dir)), LaMDAConfig(rank=4, alpha=8.0))
    moved = [not torch.equal(layer.lamda_S.detach(), saved[f"{name}.lamda_S"]) for name, layer in lamda_layers(fresh)]
    assert all(moved)
