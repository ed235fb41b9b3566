"""lamda_edge/tasks.py: the task vocabulary and the architecture-name rule (loader, adapter files, export)."""

import pytest

from lamda_edge.tasks import TASKS, task_of_architectures


@pytest.mark.parametrize(
    "names,task",
    [
        pytest.param(["LlamaForCausalLM"], "causal-lm", id="causal-lm"),
        pytest.param(["GPT2LMHeadModel"], "causal-lm", id="lm-head-model"),
        pytest.param(["BertForSequenceClassification"], "sequence-classification", id="seq-cls"),
        pytest.param(["GPT2LMHeadModel", "GPT2ForSequenceClassification"], "sequence-classification",
                     id="seq-cls-wins"),
        pytest.param(["BertModel"], None, id="bare-encoder"),
        pytest.param([], None, id="none"),
    ],
)
def test_task_of_architectures(names, task):
    assert task_of_architectures(names) == task
    assert task is None or task in TASKS
