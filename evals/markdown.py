"""Untrusted strings inside Markdown: as literal text or as a code span, never as markup.

A candidate URI, a gate reason, a run name or a chat message is data someone else wrote. Put into Markdown as
is, `![p](http://evil.example/p.png)` makes every reader's browser fetch that URL, and a backtick closes the
code span around it. Two helpers, used by `gate_report.md` and by every dashboard page:

- `text(s)`: the characters that open markup backslash-escaped (brackets, braces, backtick, backslash and
  `! < > & * ~ $ | #`, `_` at a word's edge), so no
  image, link, HTML, emphasis, heading, quote, table cell, math or Streamlit `:color[...]` directive can start;
  the rest (`.`, `:`, `-`, `=`) stays readable in the raw file. A list marker may still start a line: it loads
  nothing.
  Escapes alone do not stop GFM's *literal* autolinks: remark (Streamlit, and GitHub's second pass) finds
  `http://`, `www.` and `a@b.c` in the already-unescaped text. A WORD JOINER (U+2060, invisible) after
  `:` / before `.` / before `@` breaks those patterns.
- `code(s)`: a code span whose fence is longer than any backtick run inside, so the content cannot close it.
  Code spans are never autolinked. Block structure is parsed before spans, so newlines become spaces.
"""

from __future__ import annotations

import re

# `_` inside a word (`rouge_l`) cannot open emphasis in CommonMark, so it stays unescaped and readable.
_MARKUP = re.compile(r"([\\`*\[\]<>!&|~$#{}]|(?<!\w)_|_(?!\w))")
_AUTOLINK = re.compile(r"(?i)(?<=:)(?=//)|(?<=\bwww)(?=\.)|(?=@)")
WORD_JOINER = "\u2060"


def _one_line(s: object) -> str:
    return " ".join(str(s).splitlines())


def text(s: object, *, multiline: bool = False) -> str:
    """`s` as literal Markdown text; one line unless `multiline` (then line breaks are kept as hard breaks)."""
    raw = str(s) if multiline else _one_line(s)
    escaped = _MARKUP.sub(r"\\\1", _AUTOLINK.sub(WORD_JOINER, raw))
    return escaped.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "  \n") if multiline else escaped


def code(s: object) -> str:
    """`s` as an inline code span that nothing inside can close."""
    s = _one_line(s)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", s)), default=0) + 1)
    # CommonMark strips one space on each side when both are there: pad when the content touches a fence.
    pad = " " if s[:1] in ("`", " ") or s[-1:] in ("`", " ") else ""
    return f"{fence}{pad}{s}{pad}{fence}"
