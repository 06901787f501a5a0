"""The published folder's pure steps (training/export.py): SYSTEM text, Ollama names, converter checks, links."""

from __future__ import annotations

import pytest

from flywheel.foundation.errors import InputError
from flywheel.training.export import ADAPTER_CAVEAT, check_converters, link_or_copy, ollama_name, static_system
from flywheel.training.export_config import PublishConfig


@pytest.mark.parametrize("text", ["Use this: {{ context }}", "Answer using this context:\n{context}", "  \n",
                                  "{% if x %}y{% endif %}"])
def test_static_system_refuses_fields_and_empty(text):
    with pytest.raises(InputError, match="template field|empty"):
        static_system(text, "--system")


@pytest.mark.parametrize("name", ["a b", "x;touch y", "-rf"])
def test_a_name_ollama_would_refuse_is_one_input_error(name):
    with pytest.raises(InputError, match=r"not a valid Ollama name part .*; choose one with `name=<ollama name>`"):
        ollama_name(name)
    assert ollama_name("team/flywheel-demo:v1") == "team/flywheel-demo:v1"


def test_merged_mode_needs_the_converters_and_its_own_weights(tmp_path):
    none = str(tmp_path / "no-llama-cpp")
    with pytest.raises(InputError, match="make llama-cpp-converters"):
        check_converters(PublishConfig(llama_cpp_dir=none), [])
    with pytest.raises(InputError, match="base=ollama applies to mode=adapter only"):
        check_converters(PublishConfig(llama_cpp_dir=none, base="ollama"), [])
    warnings: list[str] = []
    assert check_converters(PublishConfig(mode="adapter", llama_cpp_dir=none), warnings) is None
    assert warnings == [ADAPTER_CAVEAT]


def test_link_or_copy_hard_links_on_one_filesystem(tmp_path):
    src = tmp_path / "base.gguf"
    src.write_bytes(b"GGUF")
    link_or_copy(src, tmp_path / "out.gguf")
    assert (tmp_path / "out.gguf").read_bytes() == b"GGUF" and src.stat().st_nlink == 2
