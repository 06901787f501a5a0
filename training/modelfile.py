"""Ollama Modelfiles: a writer and a parser for the same grammar, both pure (no I/O beyond strings).

Why this file exists: "works in Python, gibberish in Ollama" is almost always a wrong TEMPLATE or a missing
`PARAMETER stop`. So nothing here is hand-typed: `derive_chat_format` renders the tokenizer's own chat template
with sentinel messages and cuts the result into per-role prefixes/suffixes, checks that those pieces re-create
the tokenizer's output for several conversations, and only then writes an Ollama (Go) template from them. The
stop list is every special token that ends a turn (or starts the next one).

Quoting. Ollama's parser (parser/parser.go) has no escape sequences. Facts the writer relies on, all mirrored
by `parse()` below so round-trip tests mean something:
- a value ends at a newline (`\\n` or `\\r`) once the buffer so far, whitespace-trimmed, is a complete value:
  a bare word, `"..."` or `\"\"\"...\"\"\"`; spaces never end a value;
- so inside `\"\"\"...\"\"\"` the only way out is a line whose (right-trimmed) text ends in `\"\"\"`: that is the one
  injection vector (`Be nice\"\"\"` newline `FROM evil`). A `\"\"\"` in mid-line, or a value ending in `"`, is safe;
- characters Go's `strconv.IsPrint` rejects (controls, zero-width and format characters, NBSP...) are dropped
  silently by Ollama, except space, tab, CR and LF.
The writer therefore always triple-quotes free text and *transforms* the two unrepresentable cases, visibly:
non-printable characters are removed, and the last `"` of a line that would end in `\"\"\"` becomes `”` (U+201D).
Each transformation is returned as a warning; publish prints them. No text can add a directive.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Callable, Iterable, Sequence

COMMANDS = ("from", "adapter", "template", "system", "parameter", "message", "license", "draft", "renderer",
            "parser", "requires")
MESSAGE_ROLES = ("system", "user", "assistant")
SAFE_QUOTE = "\u201d"  # what the last `"` of a line ending in `\"\"\"` becomes


class ModelfileError(ValueError):
    """A Modelfile that Ollama would reject or read differently from what was meant. Carries a line number."""

    def __init__(self, msg: str, line: int | None = None):
        self.line = line
        super().__init__(f"line {line}: {msg}" if line else msg)


# ---------------------------------------------------------------------------------------------- quoting

def go_printable(ch: str) -> bool:
    """Go's strconv.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space."""
    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"


def sanitize_text(text: str) -> tuple[str, list[str]]:
    """Make `text` representable in a triple-quoted Ollama value. Returns (safe text, warnings)."""
    warnings: list[str] = []
    kept = [ch for ch in text if ch in "\t\r\n" or go_printable(ch)]
    if len(kept) != len(text):
        dropped = sorted({f"U+{ord(ch):04X}" for ch in text if not (ch in "\t\r\n" or go_printable(ch))})
        warnings.append(f"removed {len(text) - len(kept)} character(s) Ollama would drop: {', '.join(dropped)}")
    out = "".join(kept)
    # A line that ends (ignoring trailing blanks) in `\"\"\"` would close the value early: change its last quote.
    lines = _split_keep_newlines(out)
    changed = 0
    for i, line in enumerate(lines[:-1]):  # the last line is followed by our own closing quotes: safe
        body = line.rstrip("\r\n")
        stripped = body.rstrip(" \t")
        if stripped.endswith('"""'):
            k = len(stripped) - 1
            lines[i] = body[:k] + SAFE_QUOTE + body[k + 1:] + line[len(body):]
            changed += 1
    if changed:
        warnings.append(f'replaced the final quote of {changed} line(s) ending in """ with {SAFE_QUOTE} '
                        "(Ollama values have no escapes; such a line would end the value)")
    return "".join(lines), warnings


def _split_keep_newlines(text: str) -> list[str]:
    """Split after every \\n or lone \\r (both end a line for Ollama), keeping them; always >= 1 item."""
    parts, start, i = [], 0, 0
    while i < len(text):
        ch = text[i]
        if ch in "\r\n":
            if ch == "\r" and i + 1 < len(text) and text[i + 1] == "\n":
                i += 1
            parts.append(text[start:i + 1])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def quote(value: str, *, what: str = "value") -> str:
    """Quote a value that must survive exactly (templates, stop strings, paths): raise if it cannot."""
    safe, warnings = sanitize_text(value)
    if warnings:
        raise ModelfileError(f"{what} cannot be written exactly: {'; '.join(warnings)}")
    if re.fullmatch(r"[A-Za-z0-9_.+\-]+", value):
        return value  # numbers, booleans, plain words: bare, as `ollama show --modelfile` writes them
    return '"""' + value + '"""' if ('"' in value or "\n" in value or "\r" in value) else '"' + value + '"'


def quote_text(text: str) -> tuple[str, list[str]]:
    """Quote free text (SYSTEM, LICENSE, MESSAGE): transformed if needed, never able to inject a directive."""
    safe, warnings = sanitize_text(text)
    return '"""' + safe + '"""', warnings


# ---------------------------------------------------------------------------------------------- parser

@dataclass
class Command:
    name: str  # lower-case command; "parameter" keeps its key in `key`
    args: str
    line: int
    key: str | None = None  # PARAMETER key or MESSAGE role


@dataclass
class Modelfile:
    commands: list[Command] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        vals = [c.args for c in self.commands if c.name == name]
        return vals[-1] if vals else None

    def parameters(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for c in self.commands:
            if c.name == "parameter":
                out.setdefault(c.key or "", []).append(c.args)
        return out


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def _go_trim(s: str) -> str:
    return s.strip(" \t\r\n\v\f\u0085\u00a0")


def parse(text: str) -> Modelfile:
    """Parse a Modelfile the way Ollama's state machine does; raise ModelfileError where Ollama would fail."""
    if text.startswith("\ufeff"):
        text = text[1:]
    mf = Modelfile()
    state, buf, line = "nil", [], 1
    name = key = None
    cmd_line = 1

    def finish_value() -> bool:
        value, ok = _unquote(_go_trim("".join(buf)))
        if not ok:
            return False
        mf.commands.append(Command(name, value, cmd_line, key))
        return True

    for ch in text:
        if ch in "\r\n":
            line += 1
        if state == "nil":
            if ch == "#":
                state = "comment"
            elif ch in " \t\r\n":
                pass
            else:
                state, buf, cmd_line = "name", [ch], line
            continue
        if state == "comment":
            if ch in "\r\n":
                state = "nil"
            continue
        if state == "name":
            if ch.isascii() and ch.isalpha():
                buf.append(ch)
                continue
            if ch in " \t":
                name = "".join(buf).lower()
                if name not in COMMANDS:
                    raise ModelfileError(f"unknown command {''.join(buf)!r}", line)
                key = None
                state, buf = ("parameter" if name == "parameter" else "message" if name == "message"
                              else "value"), []
                continue
            raise ModelfileError(f"unknown command {''.join(buf) + ch!r}", line)
        if state in ("parameter", "message"):
            if ch in " \t":
                key = "".join(buf)
                if state == "message" and key not in MESSAGE_ROLES:
                    raise ModelfileError(f"MESSAGE role must be one of {MESSAGE_ROLES}, got {key!r}", line)
                state, buf = "value", []
                continue
            ok = (ch.isascii() and (ch.isalnum() or ch == "_")) if state == "parameter" else (
                ch.isascii() and ch.isalpha())
            if not ok:
                raise ModelfileError(f"unexpected {ch!r} in {state.upper()} name", line)
            buf.append(ch)
            continue
        # state == "value"
        if ch in "\r\n":
            if finish_value():
                state, buf = "nil", []
            else:
                buf.append(ch)
            continue
        if ch == " " or ch == "\t" or go_printable(ch):
            buf.append(ch)
        # anything else is dropped, like Ollama does
    if state == "value":
        if not finish_value():
            raise ModelfileError("unexpected end of file inside a quoted value", line)
    elif state not in ("nil", "comment"):
        raise ModelfileError("unexpected end of file", line)
    if not any(c.name == "from" for c in mf.commands):
        raise ModelfileError("no FROM line")
    return mf


# ---------------------------------------------------------------------------------------------- chat format

@dataclass
class ChatFormat:
    """A chat template cut into literal pieces; enough to write an Ollama template that renders the same text."""

    prefix: dict[str, str]  # role -> text before the content
    suffix: dict[str, str]  # role -> text after the content
    generation_prompt: str
    default_system: str | None  # what the template injects when no system message is given
    stop: list[str]

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """What the Ollama template below produces (with SYSTEM prepended as Ollama does)."""
        msgs = list(messages)
        if self.default_system is not None and (not msgs or msgs[0]["role"] != "system"):
            msgs = [{"role": "system", "content": self.default_system}] + msgs
        out = "".join(self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]] for m in msgs)
        return out + (self.generation_prompt if add_generation_prompt else "")

    def ollama_template(self) -> str:
        """Go template over `.Messages` (Ollama puts SYSTEM in as the first message when a request has none).

        No `{{-` trim markers: the literal pieces end in newlines that must survive. A trailing assistant
        message is left open (no suffix, no new generation prompt) so Ollama can continue it.
        """
        parts = ["{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"]
        first = True
        for role in MESSAGE_ROLES:
            kw = "if" if first else "else if"
            first = False
            if role == "assistant":
                parts.append(f'{{{{ {kw} eq .Role "assistant" }}}}{self.prefix[role]}{{{{ .Content }}}}'
                             f"{{{{ if not $last }}}}{self.suffix[role]}{{{{ end }}}}")
            else:
                parts.append(f'{{{{ {kw} eq .Role "{role}" }}}}{self.prefix[role]}{{{{ .Content }}}}'
                             f"{self.suffix[role]}")
        parts.append("{{ end }}")
        parts.append(f'{{{{ if and $last (ne .Role "assistant") }}}}{self.generation_prompt}{{{{ end }}}}')
        parts.append("{{ end }}")
        return "".join(parts)


Render = Callable[[list[dict], bool], str]
_S = {"system": "\x01SYS\x01", "user": "\x01USR\x01", "assistant": "\x01AST\x01"}


def _between(text: str, a: str, b: str) -> str:
    i, j = text.index(a) + len(a), text.index(b)
    return text[i:j]


def derive_chat_format(render: Render, special_tokens: Iterable[str], eos_tokens: Iterable[str] = ()) -> ChatFormat:
    """Cut a chat template into pieces by rendering sentinel conversations; verify before returning.

    `render(messages, add_generation_prompt) -> str` is the tokenizer's own renderer (e.g. a lambda over
    `tokenizer.apply_chat_template(..., tokenize=False)`). Raises ModelfileError when the template is not a
    plain per-message concatenation (then no Ollama template written by us could be trusted to match).
    """
    s, u, a = _S["system"], _S["user"], _S["assistant"]
    u2, a2 = "\x01USR2\x01", "\x01AST2\x01"
    sua = [{"role": "system", "content": s}, {"role": "user", "content": u}, {"role": "assistant", "content": a}]
    full = render(sua + [{"role": "user", "content": u2}, {"role": "assistant", "content": a2}], False)
    with_gen = render(sua[:2], True)
    without_gen = render(sua[:2], False)
    if not with_gen.startswith(without_gen):
        raise ModelfileError("chat template: the generation prompt is not a suffix; cannot derive a template")
    gen = with_gen[len(without_gen):]
    try:
        sys_prefix = full[:full.index(s)]
        asst_suffix = full[full.index(a2) + len(a2):]
        user_to_asst = _between(full, u, a)
        asst_to_user = _between(full, a, u2)
    except ValueError:
        raise ModelfileError("chat template drops message content; cannot derive a template") from None
    if not asst_to_user.startswith(asst_suffix):
        raise ModelfileError("chat template: assistant turns do not end the same way; cannot derive a template")
    user_prefix = asst_to_user[len(asst_suffix):]
    if not user_to_asst.endswith(gen):
        raise ModelfileError("chat template: the assistant prefix differs from the generation prompt")
    user_suffix = user_to_asst[:len(user_to_asst) - len(gen)]
    sys_to_user = _between(full, s, u)
    if not sys_to_user.endswith(user_prefix):
        raise ModelfileError("chat template: cannot separate the system suffix from the user prefix")
    sys_suffix = sys_to_user[:len(sys_to_user) - len(user_prefix)]

    # A template that injects a default system prompt when none is given (SmolLM2 does): find it, so the
    # Modelfile can carry it as SYSTEM and Ollama behaves like Python when the caller sends none.
    default_system = None
    no_sys = render([{"role": "user", "content": u}], True)
    head = no_sys[:no_sys.index(u)]
    if head != user_prefix:
        if not (head.startswith(sys_prefix) and head.endswith(sys_suffix + user_prefix)):
            raise ModelfileError("chat template: unrecognised text before the first user message")
        default_system = head[len(sys_prefix):len(head) - len(sys_suffix + user_prefix)]

    specials = [t for t in dict.fromkeys(special_tokens) if t]
    stop = [t for t in specials if t in asst_suffix or t in user_prefix or t in gen]
    stop += [t for t in dict.fromkeys(eos_tokens) if t and t not in stop]
    if not stop:
        raise ModelfileError("chat template: no special token ends a turn; refusing to publish without a stop")
    fmt = ChatFormat(prefix={"system": sys_prefix, "user": user_prefix, "assistant": gen},
                     suffix={"system": sys_suffix, "user": user_suffix, "assistant": asst_suffix},
                     generation_prompt=gen, default_system=default_system, stop=stop)
    for piece in [*fmt.prefix.values(), *fmt.suffix.values()]:
        if "{{" in piece or "}}" in piece:
            raise ModelfileError(f"chat template piece {piece!r} contains Go template braces")
    _verify(fmt, render)
    return fmt


def _verify(fmt: ChatFormat, render: Render) -> None:
    convs = [
        [{"role": "user", "content": "Hello"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
         {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}],
    ]
    for conv in convs:
        for gen in (True, False):
            if fmt.render(conv, gen) != render(conv, gen):
                raise ModelfileError("chat template: derived pieces do not reproduce the tokenizer's output "
                                     f"for {len(conv)} message(s); refusing to write a template")


def jinja_renderer(chat_template: str, **special: str) -> Render:
    """Render a HF chat template the way transformers does (sandboxed jinja, trim_blocks, lstrip_blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(msg):
        raise ModelfileError(f"chat template raised: {msg}")

    env.globals["raise_exception"] = raise_exception
    tmpl = env.from_string(chat_template)
    return lambda messages, gen: tmpl.render(messages=messages, add_generation_prompt=gen, **special)


# ---------------------------------------------------------------------------------------------- writer

@dataclass
class ModelfileSpec:
    base: str  # a relative path inside the output folder ("./base.gguf") or an Ollama model name
    chat: ChatFormat
    base_is_path: bool = True
    adapter: str | None = None  # relative path inside the output folder
    system: str | None = None
    parameters: dict[str, object] = field(default_factory=dict)
    license: str | None = None
    header: Sequence[str] = ()  # comment lines (provenance)


def check_local_path(path: str, what: str) -> str:
    """Relative, normalised, no `..`: Ollama resolves paths against the Modelfile's folder."""
    p = PurePosixPath(path)
    if p.is_absolute() or path.startswith(("~", "\\")) or ".." in p.parts or "\\" in path:
        raise ModelfileError(f"{what} path {path!r} must stay inside the output folder (relative, no '..')")
    return path if path.startswith("./") else f"./{p}"


def write(spec: ModelfileSpec) -> tuple[str, list[str]]:
    """Modelfile text and warnings; the text is parsed back and compared before it is returned."""
    warnings: list[str] = []
    lines = [f"# {part}".rstrip() for h in spec.header for part in (h.splitlines() or [""])]
    if spec.base_is_path:
        base = check_local_path(spec.base, "FROM")
    else:
        base = spec.base
        if not base or any(c in base for c in ' \t\r\n"'):
            raise ModelfileError(f"FROM model name {base!r} is empty or contains blanks or quotes")
    lines.append(f"FROM {quote(base, what='FROM')}")
    adapter = None
    if spec.adapter:
        adapter = check_local_path(spec.adapter, "ADAPTER")
        lines.append(f"ADAPTER {quote(adapter, what='ADAPTER')}")
    template = spec.chat.ollama_template()
    lines.append(f"TEMPLATE {quote(template, what='TEMPLATE')}")
    for stop in spec.chat.stop:
        lines.append(f"PARAMETER stop {quote(stop, what='stop token')}")
    for key, value in spec.parameters.items():
        if value is None:
            continue
        if not key.replace("_", "").isalnum() or not key.isascii():
            raise ModelfileError(f"PARAMETER name {key!r} is not [A-Za-z0-9_]+")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            lines.append(f"PARAMETER {key} {quote(str(v).lower() if isinstance(v, bool) else str(v), what=key)}")
    system = spec.system if spec.system is not None else spec.chat.default_system
    expected_system = None
    if system is not None:
        q, w = quote_text(system)
        warnings += [f"SYSTEM: {x}" for x in w]
        expected_system = q[3:-3]
        lines.append(f"SYSTEM {q}")
    expected_license = None
    if spec.license:
        q, w = quote_text(spec.license)
        warnings += [f"LICENSE: {x}" for x in w]
        expected_license = q[3:-3]
        lines.append(f"LICENSE {q}")
    text = "\n".join(lines) + "\n"

    # Validate what we wrote with the same grammar: one command each, values exactly as intended.
    mf = parse(text)
    expect = {"from": base, "adapter": adapter, "template": template, "system": expected_system,
              "license": expected_license}
    for name, want in expect.items():
        got = [c.args for c in mf.commands if c.name == name]
        if got != ([want] if want is not None else []):
            raise ModelfileError(f"written Modelfile reads back wrong for {name.upper()}: {got!r}")
    if mf.parameters().get("stop", []) != list(spec.chat.stop):
        raise ModelfileError("written Modelfile reads back wrong stop tokens")
    return text, warnings
