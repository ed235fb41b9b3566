"""Where an export may write: never onto, around or into what `--overwrite` would delete.

Import-light (no torch), so the CLI refuses a bad `--output` before it loads anything.
"""

from __future__ import annotations

from pathlib import Path

from lamda_edge.errors import ConfigError


def check_output_location(output: Path, adapter: Path | None, model: Path | None, flag: str = "--output") -> None:
    """Refuse an output folder that is, contains or sits inside the adapter folder or the base model folder (given,
    or recorded by the adapter), or that is or contains the current directory: `--overwrite` would delete a run, a
    model or the user's work, and an export inside a model folder would change what that folder holds."""
    from lamda_edge.adapters.files import is_adapter_folder, read_adapter_config

    out = Path(output).expanduser().resolve()
    protected = []
    if adapter is not None:
        protected.append(("the adapter folder", Path(adapter), True))
        if model is None and is_adapter_folder(adapter):
            base = read_adapter_config(adapter).get("base_model")
            if base:
                protected.append(("the adapter's base model folder", Path(base), True))
    if model is not None:
        protected.append(("the model folder", Path(model), True))
    protected.append(("the current directory", Path.cwd(), False))  # an output inside it is the normal case
    for what, folder, inside_too in protected:
        folder_r = folder.expanduser().resolve()
        relation = ("is" if out == folder_r else "contains" if out in folder_r.parents
                    else "is inside" if inside_too and folder_r in out.parents else None)
        if relation:
            raise ConfigError(f"{flag} {str(output)!r} {relation} {what} ({folder}); exporting there would "
                              f"{'write into' if relation == 'is inside' else 'delete'} it. Fix: choose an output "
                              f"folder of its own, e.g. {flag} {folder_r.parent / (folder_r.name + '-onnx')}")
