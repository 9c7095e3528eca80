"""``torchrun --standalone --nproc_per_node=2`` (gloo, CPU) on a tiny ``cdm pretrain``.

Under torchrun the Trainer gives rank r the generator seeded
``seed * 1_000_003 + r`` and a batch share of ``batch_size / world``, and DDP
averages the gradients. So one process that draws both shares with both
generators, averages the two losses and steps must reach the same parameters
(up to float32 rounding of the gradient average), both ranks must hold
identical parameters, and only rank 0 may write the log and the checkpoints.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from cdm.checkpoint import load_checkpoint
from cdm.experiment import Setup, new_model
from cdm.losses import get_loss
from cdm.train import TrainConfig, Trainer

WORKER = Path(__file__).with_name("cli_worker.py")
WORLD, BATCH, SEED = 2, 16, 3
DATA = {"vocab_size": 4, "seq_len": 4}
CLI = ["pretrain", "--data-option", "vocab_size=4", "--data-option", "seq_len=4", "--batch-size", str(BATCH),
       "--warmup", "2", "--log-every", "1", "--save-every", "2", "--seed", str(SEED), "--quiet"]

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and importlib.util.find_spec("torch.distributed.run")),
    reason="needs torch.distributed with gloo and torchrun (torch.distributed.run)",
)


def torchrun(out: Path, dump: Path, steps: int, *extra: str, cli: list = CLI) -> None:
    dump.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               str(WORKER), "--dump-dir", str(dump), "--", *cli, "--steps", str(steps), "--out", str(out), *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def single_process_reference(out: Path, steps: int) -> tuple[Trainer, list[torch.Generator]]:
    """The same training as WORLD ranks, in one process: each step draws every rank's
    share with that rank's generator, and the loss is the mean of the shares' losses."""
    setup = Setup(data="markov", data_options=dict(DATA))
    torch.manual_seed(SEED)  # as `cdm pretrain` does before building the model
    model = new_model(setup, "tiny")
    loss_fn = get_loss("score_entropy", setup.kernel_graph, setup.schedule)
    generators = [torch.Generator().manual_seed(SEED * 1_000_003 + rank) for rank in range(WORLD)]

    def global_loss(module, unused_x0, unused_generator):
        losses = []
        for generator in generators:  # each rank: draw its share, then its loss's noise
            share = setup.dataset.sample(BATCH // WORLD, generator)
            losses.append(loss_fn(module, share, generator))
        return sum(losses) / WORLD

    config = TrainConfig(steps=steps, batch_size=BATCH, lr=2e-3, warmup=2, ema=0.999, log_every=1,
                         save_every=2, seed=SEED, progress=False)
    trainer = Trainer(model, global_loss, lambda n, g: torch.zeros(n, dtype=torch.long), config, out)
    assert trainer.world == 1
    trainer.fit()
    return trainer, generators


def log_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_state_close(tensors: dict, trainer: Trainer, prefix: str, module: torch.nn.Module) -> None:
    expected = module.state_dict()
    found = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    assert found.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(found[name], value, rtol=1e-5, atol=1e-6, msg=name)


def identical_rank_dumps(dump: Path) -> list[dict]:
    """Every rank's dump (tests/cli_worker.py --dump-dir), after checking that all ranks
    hold the same weights, bit for bit (only their checkpoint-write counts may differ)."""
    ranks = [load_checkpoint(dump / f"rank{rank}.safetensors")[0] for rank in range(WORLD)]
    for name, value in ranks[0].items():
        if name != "checkpoint_writes":
            assert all(torch.equal(value, other[name]) for other in ranks[1:]), name
    return ranks


def check_run(out: Path, dump: Path, reference: Trainer, generators: list[torch.Generator], steps: int) -> None:
    ranks = identical_rank_dumps(dump)  # DDP all-reduced the same gradients
    # rank 0 alone wrote checkpoints; the log was written once (no step twice)
    assert int(ranks[0]["checkpoint_writes"]) >= 1 and int(ranks[1]["checkpoint_writes"]) == 0
    records = log_records(out / "log.jsonl")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    expected = ["checkpoint.safetensors", "log.jsonl", "teacher.safetensors"]
    if importlib.util.find_spec("tensorboard") is not None:  # one event file: rank 0's
        expected.append("tensorboard")
        assert len(os.listdir(out / "tensorboard")) == 1
    assert sorted(os.listdir(out)) == expected

    # ... and they equal one process computing the same global batch
    assert_state_close(ranks[0], reference, "model.", reference.model)
    assert_state_close(ranks[0], reference, "ema.", reference.ema)
    expected = log_records(reference.out_dir / "log.jsonl")
    for found, wanted in zip(records, expected, strict=True):
        assert found["step"] == wanted["step"] and found["lr"] == wanted["lr"]
        assert found["loss"] == pytest.approx(wanted["loss"], rel=1e-5)  # the global loss, not rank 0's share
        assert found["grad_norm"] == pytest.approx(wanted["grad_norm"], rel=1e-4)
    # the checkpoint holds every rank's generator, exactly where the reference's streams are
    checkpoint, metadata = load_checkpoint(out / "checkpoint.safetensors")
    assert metadata["step"] == steps
    for rank, generator in enumerate(generators):
        assert torch.equal(checkpoint[f"rng.{rank}"], generator.get_state()), rank
    assert_state_close(checkpoint, reference, "model.", reference.model)
    teacher, _ = load_checkpoint(out / "teacher.safetensors")
    assert_state_close({f"ema.{k}": v for k, v in teacher.items()}, reference, "ema.", reference.ema)


# A joint-CDM student whose weights depend on x_t: a step calls the model twice (the
# weights, then the components, grouped), and the weights read the shared block.
WEIGHTED_DISTILL = ["distill", "--methods", "joint", "--mixture-weights", "--latent-components", "2",
                    "--shared-blocks", "1", "--student-steps", "2", "--teacher-nfe", "1", "--teacher-steps", "2",
                    "--num-samples", "16", "--batch-size", "8", "--warmup", "1", "--seed", str(SEED), "--quiet"]


def check_weighted_distill(tmp_path: Path, *extra: str) -> None:
    """Two ranks distil a weighted student: both end with the same weights, bit for bit
    (every parameter's gradient was reduced, the weight head's included), and the head
    left its zero start."""
    torchrun(tmp_path / "run", tmp_path / "dump", 3, *extra, cli=WEIGHTED_DISTILL)
    ranks = identical_rank_dumps(tmp_path / "dump")
    assert ranks[0]["model.weight_head.linear.weight"].abs().max() > 0
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (rows[-1]["method"], rows[-1]["nfe"]) == ("cdm-joint-weighted", 2)


def test_two_ranks_distil_a_weighted_student(tmp_path):
    check_weighted_distill(tmp_path)


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    torchrun(root / "run", root / "dump", steps=3)
    return root


def test_two_ranks_match_one_process_with_the_global_batch(three_steps, tmp_path):
    reference, generators = single_process_reference(tmp_path / "reference", steps=3)
    check_run(three_steps / "run", three_steps / "dump", reference, generators, steps=3)


def test_two_ranks_resume_exactly(three_steps, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(three_steps / "run", out)
    shutil.rmtree(out / "tensorboard", ignore_errors=True)  # check_run expects one event file: this launch's
    torchrun(out, tmp_path / "dump", 5, "--resume")
    reference, generators = single_process_reference(tmp_path / "reference", steps=5)
    check_run(out, tmp_path / "dump", reference, generators, steps=5)
