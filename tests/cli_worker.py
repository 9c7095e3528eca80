"""Runs the ``cdm`` command line (``cdm.cli.main``) in a subprocess, with test hooks.

Not a test module: tests/test_kill_resume.py and tests/test_distributed.py
launch it (plainly or under ``torchrun``) as

    python tests/cli_worker.py [--pause-at-step K] [--pause-in-save N:STAGE]
                               [--dump-dir DIR] -- <cdm arguments>

--pause-at-step K    while computing training step K (1-based: steps 1..K-1 are
                     done, the loss of step K is computed, its update is not),
                     print ``PAUSED step K`` and wait to be killed.
--pause-in-save N:S  in the N-th write of a training checkpoint
                     (``checkpoint.safetensors``), at stage S of
                     ``cdm.checkpoint._save_hook`` ("created": the empty temporary
                     file exists; "written": it is complete but not renamed),
                     print ``PAUSED save N S <temporary file>`` and wait to be killed.
--dump-dir DIR       after training, every rank writes its model and EMA weights (full
                     tensors, also under FSDP), the weights of the module ``fit()``
                     returned (``result.``) and how many checkpoint files it wrote
                     to DIR/rank<r>.safetensors.

The waits are the only source of timing: the parent kills the process after it
has read the PAUSED line, so the point of the kill is exact.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def wait_to_be_killed(message: str) -> None:
    print(f"PAUSED {message}", flush=True)
    while True:
        time.sleep(60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pause-at-step", type=int)
    parser.add_argument("--pause-in-save")
    parser.add_argument("--dump-dir")
    argv = sys.argv[1:]
    split = argv.index("--")
    options, cli_args = parser.parse_args(argv[:split]), argv[split + 1:]

    import cdm.checkpoint
    import cdm.cli
    import cdm.train
    from cdm.checkpoint import save_checkpoint

    if options.pause_at_step is not None:
        get_loss, calls = cdm.cli.get_loss, [0]

        def paused_get_loss(*args, **kwargs):
            loss_fn = get_loss(*args, **kwargs)

            def loss_with_pause(model, x0, generator):
                loss = loss_fn(model, x0, generator)
                calls[0] += 1
                if calls[0] == options.pause_at_step:
                    wait_to_be_killed(f"step {calls[0]}")
                return loss

            return loss_with_pause

        cdm.cli.get_loss = paused_get_loss

    if options.pause_in_save is not None:
        count, stage = options.pause_in_save.split(":")
        saves = [0]

        def hook(current_stage, tmp_name, path):
            if path.name != "checkpoint.safetensors":
                return
            if current_stage == "created":
                saves[0] += 1
            if saves[0] == int(count) and current_stage == stage:
                wait_to_be_killed(f"save {saves[0]} {stage} {tmp_name}")

        cdm.checkpoint._save_hook = hook

    if options.dump_dir is not None:
        writes = [0]

        def counting_save(*args, **kwargs):
            writes[0] += 1
            return save_checkpoint(*args, **kwargs)

        cdm.train.save_checkpoint = counting_save
        fit = cdm.train.Trainer.fit

        def fit_and_dump(trainer):
            result = fit(trainer)
            # full tensors (FSDP shards gathered: a collective), and the module fit() returned
            tensors = {f"model.{k}": v for k, v in cdm.train._full_state_dict(trainer.model).items()}
            tensors.update({f"ema.{k}": v for k, v in cdm.train._full_state_dict(trainer.ema).items()})
            tensors.update({f"result.{k}": v.detach().clone() for k, v in result.state_dict().items()})
            tensors["checkpoint_writes"] = torch.tensor(writes[0])
            save_checkpoint(os.path.join(options.dump_dir, f"rank{trainer.rank}.safetensors"), tensors,
                            {"rank": trainer.rank, "world": trainer.world,
                             "sharded": any(type(p).__name__ == "DTensor" for p in trainer.model.parameters())})
            return result

        cdm.train.Trainer.fit = fit_and_dump

    cdm.cli.main(cli_args)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
