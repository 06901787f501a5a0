import json

import pytest

from flywheel.foundation.errors import InputError
from flywheel.training.data import load_sft_dataset, read_conversations


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


OK = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_loads_mined_dir_with_manifest_version(tiny_dataset):
    (tiny_dataset / "manifest.json").write_text(json.dumps({"version": "abc123"}), encoding="utf-8")
    try:
        ds = load_sft_dataset(tiny_dataset)
    finally:
        (tiny_dataset / "manifest.json").unlink()
    assert ds.version == "abc123" and len(ds.train) == 24 and len(ds.eval) == 4


def test_version_without_manifest_is_a_content_hash(tiny_dataset):
    a, b = load_sft_dataset(tiny_dataset), load_sft_dataset(tiny_dataset)
    assert a.version == b.version and len(a.version) == 12


@pytest.mark.parametrize("rows, message", [
    ([], "dataset is empty"),
    ([OK, {"id": "x", "text": "no messages"}], ":2: messages: missing"),
    ([{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}],
     ":1: messages[0].role: roles out of order, expected 'user'"),
    ([OK, OK, {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"},
                            {"role": "assistant", "content": "a"}]}],
     ":3: messages[1].role: roles out of order, expected 'assistant' after 'user', got 'user'"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                    {"role": "system", "content": "s"}]}], "'system' is only allowed as the first"),
    ([{"messages": [{"role": "user", "content": "q"}]}], "the last message must be 'assistant'"),
    ([{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}],
     "messages[0].content: must be a string"),
    (["{not json"], ":1: invalid JSON"),
])
def test_bad_records_name_file_line_and_field(tmp_path, rows, message):
    f = _write(tmp_path / "train.jsonl", rows)
    with pytest.raises(InputError) as e:
        read_conversations(f)
    assert message in str(e.value) and str(f) in str(e.value)


def test_missing_dataset_dir_is_clear(tmp_path):
    with pytest.raises(InputError, match="no train.jsonl"):
        load_sft_dataset(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        load_sft_dataset(tmp_path / "nope")
