"""SIGKILL a real ``cdm pretrain`` process, resume it with ``--resume``, and get
bit for bit what an uninterrupted run gets: weights, EMA, optimiser state, RNG
streams, log and the final evaluation.

The worker (tests/cli_worker.py) stops at an exact point, announces it on
stdout and waits; the test checks what is on disk at that moment, then kills
it with SIGKILL. Kill points: in the middle of a training step after a
checkpoint exists, and inside a checkpoint save (the temporary file empty, or
complete but not yet renamed), including the very first save, when no
checkpoint exists yet.
"""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from cdm.checkpoint import load_checkpoint

WORKER = Path(__file__).with_name("cli_worker.py")
STEPS, SAVE_EVERY = 8, 3
CLI = ["pretrain", "--data-option", "vocab_size=4", "--data-option", "seq_len=4", "--steps", str(STEPS),
       "--batch-size", "16", "--warmup", "2", "--log-every", "1", "--save-every", str(SAVE_EVERY), "--seed", "5",
       "--quiet"]
TIMEOUT = 120

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


def worker_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_to_completion(out: Path, *extra: str) -> str:
    done = subprocess.run([sys.executable, str(WORKER), "--", *CLI, "--out", str(out), *extra],
                          env=worker_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def run_until_paused(out: Path, *pause: str) -> tuple[subprocess.Popen, str]:
    """Start the worker with a pause option; return it (alive, waiting) and its PAUSED line."""
    stderr = open(out.parent / f"{out.name}.stderr", "w+")
    process = subprocess.Popen([sys.executable, str(WORKER), *pause, "--", *CLI, "--out", str(out)],
                               env=worker_env(), stdout=subprocess.PIPE, stderr=stderr, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout] + [lines.put(None)],
                     daemon=True).start()
    try:
        while True:
            line = lines.get(timeout=TIMEOUT)
            if line is None or line.startswith("PAUSED"):
                break
    except queue.Empty:
        line = None
    if line is None:
        process.kill()
        process.wait()
        stderr.seek(0)
        pytest.fail(f"the worker never paused (exit code {process.returncode}):\n{stderr.read()[-3000:]}")
    return process, line.split(maxsplit=1)[1].strip()


def sigkill(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def records(out: Path) -> list[dict]:
    """log.jsonl without the wall-clock field."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (out / "log.jsonl").read_text().splitlines()]


def temporaries(out: Path) -> list[str]:
    return sorted(name for name in os.listdir(out) if name.endswith(".tmp"))


def checkpoint_step(out: Path) -> int:
    """The step of the checkpoint on disk; it must load (never a partial file)."""
    _, metadata = load_checkpoint(out / "checkpoint.safetensors")
    return metadata["step"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    stdout = run_to_completion(out)
    return out, stdout


def assert_identical_runs(resumed: Path, resumed_stdout: str, uninterrupted) -> None:
    straight, straight_stdout = uninterrupted
    # the final model file (EMA weights + metadata) is the same file, byte for byte
    assert (resumed / "teacher.safetensors").read_bytes() == (straight / "teacher.safetensors").read_bytes()
    # every tensor of the last checkpoint: weights, EMA, AdamW moments, RNG state
    tensors, metadata = load_checkpoint(resumed / "checkpoint.safetensors")
    expected, expected_metadata = load_checkpoint(straight / "checkpoint.safetensors")
    assert metadata == expected_metadata and metadata["step"] == STEPS
    assert tensors.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(tensors[name], value), name
    # the training curve: one record per step, none repeated, the same numbers
    assert records(resumed) == records(straight)
    assert [r["step"] for r in records(resumed)] == list(range(1, STEPS + 1))
    # the evaluation printed at the end (same weights, same sampling seed)
    assert resumed_stdout.split("sampler:")[-1] == straight_stdout.split("sampler:")[-1]
    assert temporaries(resumed) == []


def test_kill_mid_training_then_resume(tmp_path, uninterrupted):
    out = tmp_path / "run"
    process, where = run_until_paused(out, "--pause-at-step", "5")
    assert where == "step 5"
    # steps 1..4 are done and logged; the checkpoint of step 3 is complete
    assert checkpoint_step(out) == SAVE_EVERY
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4]
    sigkill(process)
    stdout = run_to_completion(out, "--resume")
    assert f"resumed at step {SAVE_EVERY}" in stdout
    assert_identical_runs(out, stdout, uninterrupted)


@pytest.mark.parametrize("save, stage", [(2, "written"), (1, "created")])
def test_kill_during_a_checkpoint_save_then_resume(tmp_path, uninterrupted, save, stage):
    out = tmp_path / "run"
    process, where = run_until_paused(out, "--pause-in-save", f"{save}:{stage}")
    _, _, paused_stage, tmp_name = where.split()
    assert paused_stage == stage and Path(tmp_name).parent == out and Path(tmp_name).exists()
    size = Path(tmp_name).stat().st_size
    assert (size > 0) == (stage == "written")
    if save == 1:  # the first save: no checkpoint yet
        assert not (out / "checkpoint.safetensors").exists()
    else:  # the previous checkpoint, intact
        assert checkpoint_step(out) == (save - 1) * SAVE_EVERY
    assert [r["step"] for r in records(out)] == list(range(1, save * SAVE_EVERY + 1))
    sigkill(process)
    assert temporaries(out) == [Path(tmp_name).name]  # the kill left the temporary file behind

    stdout = run_to_completion(out, "--resume")
    if save == 1:
        assert "resumed" not in stdout  # nothing to resume from: a fresh start, log included
    else:
        assert f"resumed at step {(save - 1) * SAVE_EVERY}" in stdout
    assert_identical_runs(out, stdout, uninterrupted)


def test_a_corrupt_checkpoint_is_refused_not_loaded(tmp_path, uninterrupted):
    """A checkpoint truncated outside our control (disk, copy) is reported, never half-loaded."""
    straight, _ = uninterrupted
    out = tmp_path / "run"
    out.mkdir()
    data = (straight / "checkpoint.safetensors").read_bytes()
    (out / "checkpoint.safetensors").write_bytes(data[: len(data) // 2])
    done = subprocess.run([sys.executable, "-m", "cdm.cli", *CLI, "--out", str(out), "--resume"],
                          env=worker_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 2
    assert "corrupt" in done.stderr and "Traceback" not in done.stderr
    assert not (out / "teacher.safetensors").exists()
