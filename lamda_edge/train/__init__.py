"""A training run: run config (YAML, flags, key=value), data, chunked loss, the Trainer and its callbacks, the
recipe that puts them together, and the reports a run leaves behind.

    config.py     `RunConfig` and how YAML, flags and key=value become one
    data.py       files -> token datasets, padding-aware batches, packing (causal LM)
    packed_attention.py  packed rows attend per example (causal SDPA on each slice, no block-diagonal mask)
    labels.py     classification JSONL (text, label[, text_pair]) -> datasets, the label map
    pairs.py      seq2seq JSONL (source, target) -> datasets, loss on the target only
    loss.py       the chunked lm_head + cross-entropy
    trainer.py    `LossModel` (and its classifier / seq2seq kinds), `LaMDATrainer` (adapter-only atomic checkpoints)
    callbacks.py  B freezing on schedule, the progress bar
    recipe.py     `train(config)`: the steps of `TrainRecipe` (plan, setup_data, setup_model, setup_trainer, run,
                  finish)
    report.py     metrics.json, loss_curve.png, the printed summary

Importing this package is cheap; `train` loads the recipe (and transformers' Trainer) on first call.
"""


def train(*args, **kwargs):
    """Run one fine-tuning job; see `lamda_edge.train.recipe.train`."""
    from lamda_edge.train.recipe import train as run

    return run(*args, **kwargs)
