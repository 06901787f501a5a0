"""What a training output directory keeps for --resume (training/checkpoints.py)."""

from __future__ import annotations

from flywheel.training.checkpoints import STATE_FILE, read_state, resume_checkpoint, write_state


def test_state_round_trips_and_a_missing_or_torn_file_is_no_state(tmp_path):
    assert read_state(tmp_path) == {}
    write_state(tmp_path, {"run_id": "abc", "config": {"max_steps": 3}})
    assert read_state(tmp_path) == {"run_id": "abc", "config": {"max_steps": 3}}
    (tmp_path / STATE_FILE).write_text('{"run_id": "ab', encoding="utf-8")  # killed mid-write by hand
    assert read_state(tmp_path) == {}


def test_resume_takes_the_newest_complete_checkpoint(tmp_path):
    assert resume_checkpoint(tmp_path) is None
    ckpts = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):  # 6: a kill -9 mid-save
        d = ckpts / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(b"x")
        (d / "optimizer.pt").write_bytes(b"x")
        if complete:
            (d / "trainer_state.json").write_text("{}", encoding="utf-8")
    assert resume_checkpoint(tmp_path) == ckpts / "checkpoint-4"
