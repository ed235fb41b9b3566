"""Replace one generated section of a markdown page, keeping the rest (tools share docs/planner-accuracy.md).

A section sits between `<!-- BEGIN name -->` and `<!-- END name -->` lines; a page without them gets the section
appended. Written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path


def replace_section(path: str | Path, name: str, body: str, title: str | None = None) -> None:
    """Put `body` between the markers of section `name` in `path` (created, with `title`, if missing)."""
    path = Path(path)
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.is_file() else (f"# {title}\n\n" if title else "")
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_section(path: str | Path, name: str) -> str | None:
    """The body of section `name` in `path`, or None."""
    text = Path(path).read_text() if Path(path).is_file() else ""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    if begin not in text or end not in text:
        return None
    return text.split(begin, 1)[1].split(end, 1)[0].strip("\n")
