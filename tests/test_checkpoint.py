"""Checkpoint publication is atomic: a crash while saving leaves the last good one."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megatron_transfusion.training import checkpoint
from megatron_transfusion.training.engine import Engine


class FileEngine(Engine):
    """Stores one tensor; can be told to crash half-way through a save."""

    def __init__(self):
        self.value = torch.zeros(3)
        self.crash = False
        self.model_chunks = []

    def train_step(self, micro_batches, lr):
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True)
        save_file({"value": self.value}, directory / "part1.safetensors")
        if self.crash:
            raise RuntimeError("killed while saving")

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        self.value = load_file(directory / "part1.safetensors")["value"]


def save(engine, directory, step, keep_last=2):
    rng = {"noise": torch.tensor([step])}
    return checkpoint.save_checkpoint(directory, step, engine, {"loader": {"rows": step}}, rng, keep_last)


def test_crash_during_save_keeps_the_previous_checkpoint(megatron_world, tmp_path):
    engine = FileEngine()
    engine.value = torch.tensor([1.0, 2.0, 3.0])
    save(engine, tmp_path, 2)
    engine.value = torch.tensor([9.0, 9.0, 9.0])
    engine.crash = True
    with pytest.raises(RuntimeError, match="killed while saving"):
        save(engine, tmp_path, 4)
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_00000002"
    assert not (tmp_path / "step_00000004").exists()
    fresh = FileEngine()
    state, rng = checkpoint.load_checkpoint(checkpoint.resolve_resume(tmp_path, "auto"), fresh)
    assert torch.equal(fresh.value, torch.tensor([1.0, 2.0, 3.0]))
    assert state == {"step": 2, "loader": {"rows": 2}} and int(rng["noise"]) == 2
    # The next save succeeds and clears the debris; only keep_last checkpoints remain.
    engine.crash = False
    for step in (4, 6, 8):
        save(engine, tmp_path, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000006", "step_00000008"]


def test_resume_choices(megatron_world, tmp_path):
    assert checkpoint.resolve_resume(tmp_path, "auto") is None  # nothing saved yet: fresh start
    assert checkpoint.resolve_resume(tmp_path, "none") is None
    with pytest.raises(FileNotFoundError, match="missing or incomplete"):
        checkpoint.resolve_resume(tmp_path, str(tmp_path / "step_00000099"))
    (tmp_path / "latest").write_text("step_00000005")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.resolve_resume(tmp_path, "auto")


def test_checkpoint_files_load_without_pickle(megatron_world, tmp_path):
    engine = FileEngine()
    path = save(engine, tmp_path, 1)
    assert json.loads((path / "trainer.json").read_text())["step"] == 1
    assert sorted(p.suffix for p in path.rglob("*") if p.is_file()) == [".json", ".safetensors", ".safetensors"]
