"""Untrusted strings in Markdown stay text: no image, link or HTML survives `flywheel.evals.markdown` or gate_report.md."""

from __future__ import annotations

import re

import pytest

from flywheel.evals import gate as g
from flywheel.evals import markdown as md

EVIL = "x` ![p](http://evil.example/p.png)"
HOSTILE = [
    EVIL,
    "![p](http://evil.example/p.png)",
    "[click](http://evil.example/) <img src=http://evil.example/i.png> <http://evil.example/a>",
    "see http://evil.example/p.png or www.evil.example or ops@evil.example",
    "```` fence `` and a trailing `",
    "line one\n![p](http://evil.example/p.png)\n# heading\n> quote",
    ":red[$\\href{http://evil.example}{x}$] [ref]: http://evil.example/r",
]

# GFM literal autolinks (mdast-util-gfm-autolink-literal): remark finds these in *text* after escapes are
# resolved, so the check runs on parsed text, the way Streamlit's renderer sees it.
_GFM_LITERAL = re.compile(r"(?i)(https?://|www(?=\.))[-.\w]+|[-.\w+]+@[-\w]+(?:\.[-\w]+)+")


def outside_refs(source: str, host: str = "evil.example") -> list[str]:
    """What in `source`, rendered as CommonMark + GFM tables, would load or link `host`: images, links, raw
    HTML, and GFM literal autolinks in the text."""
    from markdown_it import MarkdownIt

    found = []

    def walk(tokens):
        for t in tokens:
            if t.type in ("image", "link_open") and host in str(t.attrs.get("src") or t.attrs.get("href") or ""):
                found.append(f"{t.type} {t.attrs}")
            elif t.type in ("html_inline", "html_block"):
                found.append(f"{t.type} {t.content!r}")
            elif t.type == "text" and any(host in m.group(0) for m in _GFM_LITERAL.finditer(t.content)):
                found.append(f"autolink in {t.content!r}")
            walk(t.children or [])

    walk(MarkdownIt("commonmark").enable(["table", "strikethrough"]).parse(source))
    return found


def test_oracle_sees_what_a_browser_would_load():
    assert outside_refs(f"candidate `{EVIL}`")  # the old report line: the backtick closes the code span
    assert outside_refs("see http://evil.example/x")
    assert not outside_refs("`http://evil.example/x`")


@pytest.mark.parametrize("hostile", HOSTILE)
def test_text_and_code_are_inert(hostile):
    for rendered in (md.text(hostile), md.code(hostile), md.text(hostile, multiline=True)):
        for context in ("{}", "- {}", "| a | {} |\n|---|---|", "**{}**"):
            assert outside_refs(context.format(rendered)) == [], (context, rendered)


def test_text_keeps_the_words_readable():
    from markdown_it import MarkdownIt

    html = MarkdownIt("commonmark").render(md.text("rougeL: 0.21 < 0.34 (a_b) *x*"))
    assert html == "<p>rougeL: 0.21 &lt; 0.34 (a_b) *x*</p>\n"
    assert md.code("a `b` c") == "``a `b` c``" and md.code("`x`") == "`` `x` ``"


def test_gate_report_escapes_candidate_and_reasons():
    gate = {"decision": g.ERROR, "exit_code": 2, "variant": "v` ![v](http://evil.example/v.png)",
            "eval_run_id": "abc", "checks": [{
                "role": "primary", "metric": "m|![m](http://evil.example/m.png)", "baseline": 0.2, "candidate": 0.3,
                "difference": 0.1, "ci_low": 0.0, "ci_high": 0.2, "p_value": 0.01, "p_adjusted": 0.02, "n": 30,
                "rule": "[r](http://evil.example/r)", "status": g.ERROR}],
            "reasons": [f"cannot resolve candidate {EVIL}", "see www.evil.example"]}
    report = g.report_markdown(gate, baseline_label="base <img src=http://evil.example/b.png>", candidate_label=EVIL)
    assert outside_refs(report) == []
    assert "evil.example/p.png" in report  # shown, as text
    # The table keeps its shape: the metric's `|` does not open a new cell.
    from markdown_it import MarkdownIt

    cells = [t for t in MarkdownIt("commonmark").enable("table").parse(report) if t.type == "td_open"]
    assert len(cells) == 10
