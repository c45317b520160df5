"""Run-folder writes: atomic, and readable by whoever a plain open() would let read them."""
import json
import os
import stat

import pytest
import torch

from flgcore.runs import atomic_write_text, latest_checkpoint, save_checkpoint, write_json


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_run_files_and_checkpoints_get_the_umask_mode_not_0600(tmp_path, umask_022):
    write_json(tmp_path / "metrics.json", {"a": 1})
    atomic_write_text(tmp_path / "sub" / "config.yaml", "x: 1\n")
    ck = save_checkpoint(tmp_path, 3, {"w": torch.zeros(2)})
    assert _mode(tmp_path / "metrics.json") == 0o644
    assert _mode(tmp_path / "sub" / "config.yaml") == 0o644
    assert _mode(ck) == 0o755


def test_a_rewrite_replaces_the_file_and_leaves_no_temp_files(tmp_path):
    write_json(tmp_path / "m.json", {"a": 1})
    write_json(tmp_path / "m.json", {"a": 2})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_checkpoints_keep_the_newest_two_complete_ones(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"step": step})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000002", "step_00000003"]
    (tmp_path / "checkpoints" / "step_00000004").mkdir()  # an incomplete folder (no state.pt) is never resumed
    assert latest_checkpoint(tmp_path).name == "step_00000003"


def test_a_run_folder_is_not_resumed_under_another_config(tmp_path):
    """Resuming must not mix a new config with an old run's weights and schedule; a runtime setting may change."""
    from conftest import TINY_ARCH
    from flgcore.cli import main
    args = ["pretrain", f"out={tmp_path}", "steps=2", "batch_size=2", "warmup=1", "ckpt_every=1", *TINY_ARCH]
    assert main(args) == 0
    saved = (tmp_path / "config.yaml").read_text()
    assert main([*args[:2], "steps=4", *args[3:]]) == 2  # a new schedule: refused, and the folder is untouched
    assert (tmp_path / "config.yaml").read_text() == saved
    assert main([*args, "log_every=5", "device=cpu"]) == 0  # how it runs, not what it computes: resumes
