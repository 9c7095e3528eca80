import os

import pytest
import torch
from safetensors.torch import save_file

import cdm.checkpoint
from cdm.checkpoint import CheckpointError, check_metadata, load_checkpoint, save_checkpoint


def example_state():
    generator = torch.Generator().manual_seed(0)
    return {
        "weight": torch.randn(3, 4, generator=generator),
        "half": torch.randn(5, generator=generator).to(torch.bfloat16),
        "steps": torch.arange(6).reshape(2, 3),
        "strided": torch.randn(4, 4, generator=generator).T,  # non-contiguous on purpose
    }


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    state = example_state()
    metadata = {"step": 12, "config": {"hidden": 64, "graph": "uniform"}, "lr": 3e-4, "tags": [1, 2]}
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, state, metadata)
    tensors, loaded_metadata = load_checkpoint(path)
    assert loaded_metadata == metadata
    assert tensors.keys() == state.keys()
    for name, tensor in state.items():
        assert tensors[name].dtype == tensor.dtype
        assert torch.equal(tensors[name], tensor)


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"x": torch.zeros(3)}, {"step": 1})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cdm.checkpoint.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, {"x": torch.ones(3)}, {"step": 2})
    monkeypatch.undo()

    tensors, metadata = load_checkpoint(path)
    assert metadata == {"step": 1} and torch.equal(tensors["x"], torch.zeros(3))
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]  # no temporary file left behind


def test_unserialisable_metadata_writes_nothing(tmp_path):
    with pytest.raises(TypeError, match="metadata"):
        save_checkpoint(tmp_path / "c.safetensors", {"x": torch.zeros(1)}, {"bad": object()})
    assert os.listdir(tmp_path) == []


def test_save_validates_arguments(tmp_path):
    with pytest.raises(TypeError, match="tensors"):
        save_checkpoint(tmp_path / "c.safetensors", {"x": [1, 2]})
    with pytest.raises(TypeError, match="metadata"):
        save_checkpoint(tmp_path / "c.safetensors", {"x": torch.zeros(1)}, metadata="step=1")
    with pytest.raises(FileNotFoundError, match="directory"):
        save_checkpoint(tmp_path / "missing" / "c.safetensors", {"x": torch.zeros(1)})


def test_missing_and_corrupt_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "absent.safetensors")

    path = tmp_path / "c.safetensors"
    save_checkpoint(path, example_state(), {"step": 3})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)

    path.write_bytes(b"definitely not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_foreign_safetensors_file_is_reported(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="without cdm metadata"):
        load_checkpoint(path)


def test_check_metadata_names_every_mismatch():
    found = {"hidden": 64, "graph": "uniform", "step": 10}
    check_metadata(found, {"hidden": 64, "graph": "uniform"})
    with pytest.raises(ValueError) as error:
        check_metadata(found, {"hidden": 128, "graph": "uniform", "vocab_size": 27}, what="teacher")
    message = str(error.value)
    assert "teacher" in message and "hidden: teacher has 64, expected 128" in message
    assert "vocab_size" in message and "<missing>" in message and "graph" not in message
