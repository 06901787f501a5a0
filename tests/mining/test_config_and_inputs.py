"""The mining config documents every setting; the loop and `flywheel mine` agree on what an input file is."""

from pydantic import BaseModel

from flywheel.mining import readers, slices
from flywheel.mining.config import MineConfig


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, f in model.model_fields.items():
        yield prefix + name, f
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _fields(ann, f"{prefix}{name}.")


def test_every_mine_setting_has_a_description():
    missing = [name for name, f in _fields(MineConfig) if not f.description]
    assert missing == []


def test_loop_slices_exactly_the_files_mine_reads(tmp_path):
    for name in ("a.jsonl", "b.JSON", "c.csv", "d.ndjson", "e.tsv", ".hidden.jsonl", "notes.txt"):
        (tmp_path / name).write_text('{"messages": []}\n')
    mined = readers.expand_inputs([tmp_path])
    assert [p.name for p in mined] == ["a.jsonl", "b.JSON", "c.csv"]
    assert slices.expand_inputs([str(tmp_path)]) == [p.resolve() for p in mined]
