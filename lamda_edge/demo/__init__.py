"""The built-in default: SmolLM2-135M-Instruct from a PyPI wheel (`default_model.py`) and GSM8K-style word problems
with before/after metrics (`task.py`). `lamda-edge train` with no `--model` or `--data` runs these.
"""
