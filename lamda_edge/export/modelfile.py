"""The Ollama `Modelfile` beside a GGUF export: `ollama create NAME -f Modelfile`, then `ollama run NAME`.

    FROM ./model.<type>.gguf
    TEMPLATE '''...'''     ChatML templates only (SmolLM2, Qwen): Ollama's Go template of the same turns
    SYSTEM '''...'''       the default system prompt the chat template adds when a chat has none
    PARAMETER stop "..."   the end-of-turn token(s)

Ollama's templates are Go templates, not Jinja: only a chat template recognised as ChatML (by rendering it) is
translated. For another template the Modelfile leaves TEMPLATE out, and Ollama falls back on the Jinja template that
the GGUF file carries (tokenizer.chat_template) where it recognises it.
"""

from __future__ import annotations

from pathlib import Path

from lamda_edge.atomic import write_bytes_atomic

MODELFILE = "Modelfile"  # its name beside the .gguf file

CHATML_GO_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}{{- if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    "{{ end }}{{- end }}<|im_start|>assistant\n"
)
_USER, _SYSTEM = "\x00USER\x00", "\x00SYSTEM\x00"


def chatml_default_system(tokenizer) -> tuple[bool, str | None]:
    """(whether the chat template is ChatML, the system prompt it adds when a chat has none)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return False, None

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    turn = f"<|im_start|>user\n{_USER}<|im_end|>\n<|im_start|>assistant\n"
    try:
        with_system = render([{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _USER}])
        plain = render([{"role": "user", "content": _USER}])
    except Exception:  # a template that needs other inputs (tools, dates) is not plain ChatML
        return False, None
    if with_system != f"<|im_start|>system\n{_SYSTEM}<|im_end|>\n" + turn or not plain.endswith(turn):
        return False, None
    prefix = plain[:-len(turn)]
    if not prefix:
        return True, None
    head, tail = "<|im_start|>system\n", "<|im_end|>\n"
    if prefix.startswith(head) and prefix.endswith(tail):
        return True, prefix[len(head):-len(tail)]
    return False, None


def modelfile_text(gguf_file: str, tokenizer) -> tuple[str, dict]:
    """The Modelfile's text and a description of it (for the report)."""
    chatml, system = chatml_default_system(tokenizer)
    stops = [t for t in dict.fromkeys([tokenizer.eos_token, "<|im_end|>" if chatml else None]) if t]
    lines = ["# Ollama: ollama create NAME -f Modelfile (in this folder), then: ollama run NAME",
             f"FROM ./{gguf_file}"]
    if chatml:
        lines.append(f'TEMPLATE """{CHATML_GO_TEMPLATE}"""')
    else:
        lines.append("# no TEMPLATE: the chat template is not ChatML; Ollama uses the file's tokenizer.chat_template")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n", {"template": "chatml" if chatml else None, "system": system, "stop": stops}


def write_modelfile(path: Path, gguf_file: str, tokenizer) -> dict:
    """Write the Modelfile at `path` (atomically); return its description."""
    text, info = modelfile_text(gguf_file, tokenizer)
    write_bytes_atomic(path, text.encode())
    return info
