"""``torchrun --standalone --nproc_per_node=2`` (gloo, CPU) on a tiny ``cdm pretrain --fsdp``.

FSDP2 shards the weights, AdamW state and EMA over the ranks, reduce-scatters
the mean gradient (what DDP all-reduces) and gathers full tensors for the
checkpoint. So an FSDP run must reach the DDP run's weights (and the
single-process reference's, as tests/test_distributed.py checks for DDP),
write the same checkpoint format (full tensors, rank 0 alone), resume from it
exactly, return a plain unsharded module from ``fit()`` on every rank, and its
checkpoint must load in one process.
"""

import importlib.util
import shutil

import pytest
import torch
import torch.distributed as dist

from cdm.checkpoint import load_checkpoint
from cdm.experiment import Setup, new_model
from cdm.losses import get_loss
from cdm.train import TrainConfig, Trainer
from test_distributed import (BATCH, DATA, SEED, WORLD, check_run, check_weighted_distill, single_process_reference,
                              torchrun)


def _has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2, torch >= 2.6)
    except ImportError:
        return False
    return True


pytestmark = [
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available() and importlib.util.find_spec("torch.distributed.run")),
        reason="needs torch.distributed with gloo and torchrun (torch.distributed.run)",
    ),
    pytest.mark.skipif(not (dist.is_available() and _has_fsdp2()),
                       reason="needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6)"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three steps under DDP and under FSDP, from the same seed."""
    root = tmp_path_factory.mktemp("fsdp")
    torchrun(root / "ddp", root / "ddp-dump", 3)
    torchrun(root / "fsdp", root / "fsdp-dump", 3, "--fsdp")
    return root


def assert_tensors_close(found: dict, expected: dict) -> None:
    assert found.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(found[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_fsdp_matches_ddp_and_one_process(runs, tmp_path):
    reference, generators = single_process_reference(tmp_path / "reference", steps=3)
    # ranks hold identical full weights, rank 0 alone wrote, the log and checkpoint
    # equal one process computing the global batch (as for DDP)
    check_run(runs / "fsdp", runs / "fsdp-dump", reference, generators, steps=3)
    # the checkpoint: the DDP run's tensors (model, EMA, AdamW state, every rank's RNG)
    fsdp, fsdp_meta = load_checkpoint(runs / "fsdp" / "checkpoint.safetensors")
    ddp, ddp_meta = load_checkpoint(runs / "ddp" / "checkpoint.safetensors")
    assert_tensors_close(fsdp, ddp)
    assert fsdp_meta["train_config"]["fsdp"] and not ddp_meta["train_config"]["fsdp"]
    assert_tensors_close(load_checkpoint(runs / "fsdp" / "teacher.safetensors")[0],
                         load_checkpoint(runs / "ddp" / "teacher.safetensors")[0])
    # fit() returned a plain (unsharded) module on every rank: the full EMA
    for rank in range(WORLD):
        dump, dump_meta = load_checkpoint(runs / "fsdp-dump" / f"rank{rank}.safetensors")
        assert dump_meta["sharded"] and not load_checkpoint(runs / "ddp-dump" / f"rank{rank}.safetensors")[1]["sharded"]
        result = {k[7:]: v for k, v in dump.items() if k.startswith("result.")}
        assert result and all(k in result and torch.equal(result[k], v)
                              for k, v in ((k[4:], v) for k, v in dump.items() if k.startswith("ema.")))


def test_fsdp_resumes_exactly(runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs / "fsdp", out)
    shutil.rmtree(out / "tensorboard", ignore_errors=True)  # check_run expects one event file: this launch's
    torchrun(out, tmp_path / "dump", 5, "--fsdp", "--resume")
    reference, generators = single_process_reference(tmp_path / "reference", steps=5)
    check_run(out, tmp_path / "dump", reference, generators, steps=5)


def test_fsdp_checkpoint_loads_in_one_process(runs, tmp_path):
    shutil.copytree(runs / "fsdp", tmp_path / "run")
    tensors, metadata = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    setup = Setup(data="markov", data_options=dict(DATA))
    model = new_model(setup, "tiny")
    config = TrainConfig(steps=4, batch_size=BATCH, lr=2e-3, warmup=2, ema=0.999, log_every=1,
                         save_every=2, seed=SEED, progress=False, fsdp=True)  # one process: no sharding
    trainer = Trainer(model, get_loss("score_entropy", setup.kernel_graph, setup.schedule), setup.dataset.sample,
                      config, tmp_path / "run", {"name": "pretrain"})
    assert trainer.world == 1 and not trainer.fsdp
    assert trainer.resume() and trainer.step == metadata["step"] == 3
    state = trainer.state_tensors()
    for name, value in tensors.items():
        if name.startswith(("model.", "ema.", "optim.", "rng.0")):
            assert torch.equal(state[name], value), name
    assert trainer.fit() is trainer.ema and trainer.step == 4  # trains on, unsharded


def test_fsdp_distils_a_weighted_student(tmp_path):
    check_weighted_distill(tmp_path, "--fsdp")
