"""Checkpoint publication is atomic: a crash while saving leaves the last good one."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import layout
from checkpoints.sharded import model_sharded_state_dict, save_sharded
from checkpoints.train_state import begin_checkpoint, load_checkpoint
from megatron_transfusion.training.engine import Engine
from tests.distributed.equivalence_worker import load_model_shards


class FileEngine(Engine):
    """Stores one tensor; can be told to crash half-way through a save."""

    def __init__(self):
        self.value = torch.zeros(3)
        self.crash = False
        self.model_chunks = []

    def train_step(self, micro_batches, lr):
        raise NotImplementedError

    def evaluate(self, micro_batches):
        raise NotImplementedError

    def save(self, directory: Path, background: bool = False) -> None:
        directory.mkdir(parents=True)
        save_file({"value": self.value}, directory / "part1.safetensors")
        if self.crash:
            raise RuntimeError("killed while saving")

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        self.value = load_file(directory / "part1.safetensors")["value"]


def save(engine, directory, step, keep_last=2):
    rng = {"noise": torch.tensor([step])}
    return begin_checkpoint(
        directory, step, engine, {"loader": {"rows": step}}, rng, keep_last
    ).publish()


def test_crash_during_save_keeps_the_previous_checkpoint(megatron_world, tmp_path):
    engine = FileEngine()
    engine.value = torch.tensor([1.0, 2.0, 3.0])
    save(engine, tmp_path, 2)
    engine.value = torch.tensor([9.0, 9.0, 9.0])
    engine.crash = True
    with pytest.raises(RuntimeError, match="killed while saving"):
        save(engine, tmp_path, 4)
    assert layout.latest_checkpoint(tmp_path).name == "step_00000002"
    assert not (tmp_path / "step_00000004").exists()
    fresh = FileEngine()
    state, rng = load_checkpoint(layout.resolve_resume(tmp_path, "auto"), fresh)
    assert torch.equal(fresh.value, torch.tensor([1.0, 2.0, 3.0]))
    assert state == {"step": 2, "loader": {"rows": 2}} and int(rng["noise"]) == 2
    # The next save succeeds and clears the debris; only keep_last checkpoints remain.
    engine.crash = False
    for step in (4, 6, 8):
        save(engine, tmp_path, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest",
        "step_00000006",
        "step_00000008",
    ]


def test_resume_choices(megatron_world, tmp_path):
    assert layout.resolve_resume(tmp_path, "auto") is None  # nothing saved yet: fresh start
    assert layout.resolve_resume(tmp_path, "none") is None
    with pytest.raises(FileNotFoundError, match="missing or incomplete"):
        layout.resolve_resume(tmp_path, str(tmp_path / "step_00000099"))
    (tmp_path / "latest").write_text("step_00000005")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        layout.resolve_resume(tmp_path, "auto")


def test_checkpoint_files_load_without_pickle_and_are_in_the_manifest(megatron_world, tmp_path):
    engine = FileEngine()
    path = save(engine, tmp_path, 1)
    assert json.loads((path / "trainer.json").read_text())["step"] == 1
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert files == [
        "engine/part1.safetensors",
        "manifest.json",
        "rng/rank_00000.safetensors",
        "trainer.json",
    ]
    assert sorted(json.loads((path / "manifest.json").read_text())["files"]) == [
        f for f in files if f != "manifest.json"
    ]


def test_background_write_keeps_the_state_of_the_save_step(megatron_world, tmp_path):
    """Files written by the thread hold the weights at save time, though training
    updates the live tensors in place meanwhile."""
    from megatron_transfusion.config import load_config
    from megatron_transfusion.model import build_model
    from megatron_transfusion.parallel import seed_everything

    cfg = load_config("tiny", ["data.sources=[]", "eval.interval=0"])
    seed_everything(0)
    (model,) = build_model(cfg, megatron_world)
    saved = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    write = save_sharded(model_sharded_state_dict([model]), tmp_path / "ckpt", background=True)
    with torch.no_grad():
        for parameter in model.parameters():  # the optimizer step that follows the save
            parameter.add_(1.0)
    write.finish()
    assert write.done()
    load_model_shards([model], tmp_path / "ckpt")
    for key, value in model.state_dict().items():
        if key in saved:
            assert torch.equal(value, saved[key]), key
