"""The training loop, shared by teacher pre-training and every distillation
method: AdamW with linear warmup, gradient clipping, an EMA of the weights,
bf16 autocast on GPU (or fp32: ``TrainConfig.precision``), progress on stderr
(a bar on a terminal, else a line every ``log_every`` steps), JSONL logs (and TensorBoard, under ``out_dir/tensorboard``, when the package is
installed), atomic safetensors checkpoints and exact resumption (model, EMA,
optimiser and RNG state).

Under ``torchrun`` (``torch.distributed`` initialised by :func:`setup_distributed`)
the model is wrapped in DistributedDataParallel; each rank draws its own
batch share from a rank-specific generator, and rank 0 alone logs and saves.

With ``TrainConfig.fsdp`` under torchrun the model is sharded with FSDP2
(``fully_shard`` on every ``blocks[i]``, then the root; the whole model as one
unit when it has no ``blocks``) instead: parameters, gradients (reduce-scattered
means, as DDP's averages), AdamW state and the EMA are DTensor shards. The EMA is
a second module sharded the same way and updated shard by shard (elementwise, so
it equals the EMA of the full weights). Checkpoints are unchanged: every rank
joins in gathering full tensors and rank 0 writes them, so DDP, FSDP and
single-process runs resume from each other's checkpoints. ``fit()`` then returns a
plain, unsharded module (the EMA, or the model) on every rank. ``fsdp`` without
torchrun (one process) trains unsharded, as without it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import load_checkpoint, remove_stale_temporaries, save_checkpoint

#: loss_fn(model, x0, generator) -> scalar loss; the model may be DDP-wrapped
LossFn = Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor]
#: sample_batch(batch_size, generator) -> clean data (B, L) on the CPU
BatchFn = Callable[[int, torch.Generator], torch.Tensor]


LR_SCHEDULES = ("constant", "cosine")
#: what the loss is computed in on CUDA: bf16 autocast, or plain fp32 (the CPU always computes in fp32)
PRECISIONS = ("bf16", "fp32")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 128  # global: split across ranks
    lr: float = 1e-3
    warmup: int = 50
    lr_schedule: str = "constant"  # after warmup: "constant", or "cosine" (decays to 0 at the last step)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.99  # 0 disables the EMA
    log_every: int = 25
    save_every: int = 250
    seed: int = 0
    progress: bool = True  # a bar where stderr is a terminal, else a line every log_every steps
    fsdp: bool = False  # under torchrun: shard with FSDP2 instead of DDP (no effect in one process)
    precision: str = "bf16"  # on CUDA: bf16 autocast, or "fp32" (tiny networks gain nothing from bf16)

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive float, got {self.lr!r}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.warmup < 0 or self.grad_clip <= 0:
            raise ValueError("warmup must be >= 0 and grad_clip > 0")


def setup_distributed() -> tuple[int, int]:
    """Join the process group when launched by ``torchrun`` (gloo on CPU, nccl
    on GPU); returns ``(rank, world_size)``, ``(0, 1)`` for a plain run."""
    if "RANK" not in os.environ or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def default_device() -> torch.device:
    """Where a run computes when not told: this process's GPU (``cuda:LOCAL_RANK``,
    one per ``torchrun`` rank) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def learning_rate(step: int, config: TrainConfig) -> float:
    """The learning rate of step ``step`` (0-based): linear warmup, then constant or a
    cosine decay to 0 at ``config.steps``. A function of the step alone, so a resumed
    run continues the schedule exactly."""
    lr = config.lr * min(1.0, (step + 1) / max(1, config.warmup))
    if config.lr_schedule == "cosine" and step >= config.warmup:
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        lr *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return lr


def _is_dtensor(value) -> bool:
    return type(value).__name__ == "DTensor" and hasattr(value, "full_tensor")


def _full(value: torch.Tensor) -> torch.Tensor:
    """A DTensor shard's full tensor (a collective: every rank calls it, in the same order)."""
    return value.full_tensor() if _is_dtensor(value) else value


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as a flat dict (safetensors holds tensors only);
    FSDP shards are gathered into full tensors (a collective)."""
    flat = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            flat[f"optim.{index}.{key}"] = _full(value) if torch.is_tensor(value) else torch.tensor(value)
    return flat


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    restored: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            param = params[int(index)] if int(index) < len(params) else None
            if _is_dtensor(param) and value.shape == param.shape:  # FSDP: this rank's shard of the full state
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
            restored.setdefault(int(index), {})[key] = value
    state["state"] = restored
    optimizer.load_state_dict(state)


def _shard(model: nn.Module, mesh) -> None:
    """FSDP2: every DiT block its own unit, then the root (the whole model if no ``blocks``)."""
    from torch.distributed.fsdp import fully_shard

    for block in getattr(model, "blocks", ()):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _full_state_dict(module: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with FSDP shards gathered (a collective); empty unless ``keep``."""
    tensors = {}
    for name, value in module.state_dict().items():
        value = _full(value)
        if keep:
            tensors[name] = value.detach().cpu()
    return tensors


def _loss_state(loss_fn) -> dict[str, torch.Tensor]:
    """The tensors of a stateful loss (an ``nn.Module`` such as ``DMMDLoss``, with its own
    model and optimiser): its ``state_tensors()`` if defined, else its ``state_dict()``;
    empty for a plain function. The checkpoint holds them under ``loss.``."""
    if callable(getattr(loss_fn, "state_tensors", None)):
        return loss_fn.state_tensors()
    return loss_fn.state_dict() if isinstance(loss_fn, nn.Module) else {}


def _restore_loss_state(loss_fn, tensors: dict[str, torch.Tensor]) -> None:
    if callable(getattr(loss_fn, "load_state_tensors", None)):
        loss_fn.load_state_tensors(tensors)
    elif isinstance(loss_fn, nn.Module) and (tensors or loss_fn.state_dict()):
        loss_fn.load_state_dict(tensors)


def _truncate_log(path: Path, step: int) -> None:
    """Keep the records of steps ``<= step`` (and drop a line cut short): a run killed
    after its last checkpoint logged steps that the resumed run logs again."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if not line.endswith("\n") or not isinstance(record, dict) or record.get("step", 0) > step:
            break
        kept.append(line)
    if kept != lines:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


class _Progress:
    """Training progress on stderr: a tqdm bar where stderr is a terminal; elsewhere
    (a log file, CI, ``nohup``) one plain line every ``every`` steps and at the last,
    so that a log holds no redraw per step."""

    def __init__(self, name: str, total: int, initial: int, every: int):
        self.name, self.total, self.every = name, total, every
        self.start, self.bar = time.perf_counter(), None
        isatty = getattr(sys.stderr, "isatty", None)
        if isatty is not None and isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=name, leave=False)

    def update(self, step: int, loss: torch.Tensor) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss.item():.4f}")
        elif step % self.every == 0 or step == self.total:
            print(f"{self.name}: step {step}/{self.total}, loss {loss.item():.4f}, "
                  f"{time.perf_counter() - self.start:.0f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _tensorboard_writer(path: Path):
    """A TensorBoard ``SummaryWriter`` on ``path`` when the ``tensorboard`` package is
    installed, else None (the JSONL log holds the same records)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(path))


class Trainer:
    """Owns the model, its EMA, the optimiser, the RNG and the output folder."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, sample_batch: BatchFn, config: TrainConfig,
                 out_dir: str | os.PathLike, metadata: Optional[dict] = None, device="cpu"):
        self.rank, self.world = setup_distributed()
        if config.batch_size % self.world:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the {self.world} ranks")
        self.config, self.loss_fn, self.sample_batch = config, loss_fn, sample_batch
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.fsdp = config.fsdp and self.world > 1
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh

            with torch.no_grad():  # as DDP does: every rank starts from rank 0's weights
                for tensor in [*self.model.parameters(), *self.model.buffers()]:
                    dist.broadcast(tensor, 0)
            # the unsharded module fit() returns: this structure, parameters on "meta" (no memory)
            memo = {id(p): nn.Parameter(p.detach().to("meta"), p.requires_grad) for p in self.model.parameters()}
            self._template = copy.deepcopy(self.model, memo)
            mesh = init_device_mesh(self.device.type, (self.world,))
            self.ema = copy.deepcopy(self.model).requires_grad_(False) if config.ema > 0 else None
            for module in (self.ema, self.model):
                if module is not None:
                    _shard(module, mesh)  # the EMA's shards lie where the model's do
            self.module = self.model
        else:
            self.module = (
                nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
                if self.world > 1 else self.model
            )
            # after the DDP wrap, which broadcast rank 0's weights: every rank's EMA starts from them
            self.ema = copy.deepcopy(self.model).requires_grad_(False) if config.ema > 0 else None
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        # one stream per rank, so ranks see different batches and noise
        self.generator = torch.Generator().manual_seed(config.seed * 1_000_003 + self.rank)
        self.step = 0
        self.out_dir = Path(out_dir)
        self.metadata = dict(metadata or {})
        self.checkpoint_path = self.out_dir / "checkpoint.safetensors"

    # -------------------------------------------------------------- checkpoints

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors (a collective under torchrun). Under FSDP the
        shards are gathered into full tensors, which only rank 0 keeps."""
        if self.fsdp:
            keep = self.rank == 0
            tensors = {f"model.{k}": v for k, v in _full_state_dict(self.model, keep).items()}
            if self.ema is not None:
                tensors.update({f"ema.{k}": v for k, v in _full_state_dict(self.ema, keep).items()})
            tensors.update({k: v.detach().cpu() for k, v in _optimizer_tensors(self.optimizer).items() if keep})
            tensors.update({f"loss.{k}": v for k, v in _loss_state(self.loss_fn).items()})
            states = [None] * self.world
            dist.all_gather_object(states, self.generator.get_state())
            tensors.update({f"rng.{rank}": state for rank, state in enumerate(states)})
            return tensors
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        tensors.update(_optimizer_tensors(self.optimizer))
        tensors.update({f"loss.{k}": v for k, v in _loss_state(self.loss_fn).items()})
        states = [self.generator.get_state()]
        if self.world > 1:  # every rank's stream, so that a resume replays each exactly
            states = [None] * self.world
            dist.all_gather_object(states, self.generator.get_state())
        tensors.update({f"rng.{rank}": state for rank, state in enumerate(states)})
        return tensors

    def save(self) -> None:
        """Write the checkpoint (a collective under torchrun: every rank calls it; rank 0 writes)."""
        tensors = self.state_tensors()
        if self.rank != 0:
            return
        metadata = {**self.metadata, "step": self.step, "train_config": asdict(self.config)}
        save_checkpoint(self.checkpoint_path, tensors, metadata)

    def resume(self) -> bool:
        """Load the last checkpoint in ``out_dir`` if there is one; True if resumed."""
        if not self.checkpoint_path.exists():
            return False
        tensors, metadata = load_checkpoint(self.checkpoint_path, device="cpu")
        expected = {k: v for k, v in self.metadata.items() if k in metadata}
        mismatched = {k for k, v in expected.items() if metadata[k] != v}
        if mismatched:
            raise ValueError(f"--resume: the checkpoint in {self.out_dir} was written with other settings: {sorted(mismatched)}")
        if f"rng.{self.rank}" not in tensors:
            raise ValueError(f"--resume: the checkpoint holds no RNG state for rank {self.rank} (saved with fewer ranks)")
        try:
            self._load_module(self.model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            if self.ema is not None:
                self._load_module(self.ema, {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
            _restore_optimizer(self.optimizer, tensors)
            _restore_loss_state(self.loss_fn, {k[5:]: v for k, v in tensors.items() if k.startswith("loss.")})
            self.generator.set_state(tensors[f"rng.{self.rank}"])
            self.step = int(metadata["step"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise ValueError(f"--resume: {self.checkpoint_path} is not a training checkpoint of this model: {err}") from None
        return True

    def _load_module(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """``load_state_dict`` of full tensors; under FSDP each rank keeps its shards."""
        if not self.fsdp:
            module.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        expected = module.state_dict().keys()
        if state.keys() != expected:
            raise KeyError(f"missing {sorted(expected - state.keys())}, unexpected {sorted(state.keys() - expected)}")
        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))

    def _unsharded(self, module: nn.Module) -> nn.Module:
        """A plain module with ``module``'s full weights, on every rank (a collective under FSDP)."""
        if not self.fsdp:
            return module
        plain = copy.deepcopy(self._template)
        state = {k: v.full_tensor() if _is_dtensor(v) else v.detach().clone() for k, v in module.state_dict().items()}
        plain.load_state_dict(state, assign=True)
        plain.train(module.training)
        return plain.requires_grad_(False) if module is self.ema else plain

    # -------------------------------------------------------------- the loop

    def fit(self) -> nn.Module:
        """Train to ``config.steps``; returns the EMA model (or the model without EMA),
        under FSDP as a plain unsharded copy on every rank (a collective)."""
        config = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log = None
        if self.rank == 0:
            remove_stale_temporaries(self.checkpoint_path)  # left by a run killed mid-save
            _truncate_log(self.out_dir / "log.jsonl", self.step)
            log = open(self.out_dir / "log.jsonl", "a")
        board = _tensorboard_writer(self.out_dir / "tensorboard") if self.rank == 0 else None
        progress = None
        if config.progress and self.rank == 0:
            progress = _Progress(self.metadata.get("name", "train"), config.steps, self.step, config.log_every)
        self.model.train()
        start, local_batch = time.perf_counter(), config.batch_size // self.world
        autocast = self.device.type == "cuda" and config.precision == "bf16"
        try:
            while self.step < config.steps:
                for group in self.optimizer.param_groups:
                    group["lr"] = learning_rate(self.step, config)
                x0 = self.sample_batch(local_batch, self.generator).to(self.device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    loss = self.loss_fn(self.module, x0, self.generator)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.step}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = _full(nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip))
                self.optimizer.step()
                if self.ema is not None:
                    with torch.no_grad():
                        for averaged, current in zip(self.ema.parameters(), self.model.parameters()):
                            averaged.lerp_(current, 1 - config.ema)
                self.step += 1
                if progress is not None:
                    progress.update(self.step, loss)
                if self.step % config.log_every == 0 or self.step == config.steps:
                    logged = loss.detach().float()
                    if self.world > 1:  # a collective: the global batch's loss, as one process would log it
                        logged = logged.clone()
                        dist.all_reduce(logged)
                        logged /= self.world
                    if log is not None:
                        record = {"step": self.step, "loss": logged.item(), "grad_norm": grad_norm.item(),
                                  "lr": learning_rate(self.step - 1, config), "seconds": time.perf_counter() - start}
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                    if board is not None:
                        for name in ("loss", "grad_norm", "lr"):
                            board.add_scalar(f"train/{name}", record[name], self.step)
                if self.step % config.save_every == 0 or self.step == config.steps:
                    self.save()
        finally:
            if progress is not None:
                progress.close()
            if log is not None:
                log.close()
            if board is not None:
                board.close()
        return self._unsharded(self.ema if self.ema is not None else self.model)
