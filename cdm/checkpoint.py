"""Atomic safetensors checkpoints: a flat dict of tensors plus JSON metadata.

The metadata (any JSON-serialisable dict: config, step, schedule, ...) is
stored as one JSON string under the safetensors header key ``"cdm"``.

Saving is atomic: the file is written to a temporary name in the target's
directory, flushed and fsynced, then moved over the target with
``os.replace``. A crash or error mid-write leaves any previous checkpoint at
``path`` untouched and no partial file behind; a process killed mid-write
(SIGKILL, power loss) can leave only its temporary file, which
:func:`remove_stale_temporaries` deletes and which is never read as a checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "check_metadata", "remove_stale_temporaries",
           "shape_mismatches"]

METADATA_KEY = "cdm"

#: Test-only hook, ``None`` in normal use: ``save_checkpoint`` calls it as
#: ``hook(stage, tmp_name, path)`` at ``stage="created"`` (the empty temporary file
#: exists) and ``stage="written"`` (it is complete and fsynced, not yet renamed),
#: so that a test can kill the process at those points (tests/test_kill_resume.py).
_save_hook: Optional[Callable[[str, str, Path], None]] = None


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be read (truncated, corrupt, not ours)."""


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                    metadata: dict[str, Any] | None = None) -> None:
    """Write ``tensors`` and ``metadata`` to ``path`` atomically.

    tensors: name -> tensor (any device; copied to CPU, made contiguous).
    Tensors must not share memory (safetensors refuses tied weights).
    metadata: JSON-serialisable dict, or None for ``{}``.
    """
    if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise TypeError("tensors must be a dict mapping str to torch.Tensor")
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    try:
        header = {METADATA_KEY: json.dumps(metadata or {}, sort_keys=True)}
    except TypeError as err:
        raise TypeError(f"metadata must be JSON-serialisable: {err}") from err
    cpu_tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}

    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"directory of path does not exist: {directory}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        if _save_hook is not None:
            _save_hook("created", tmp_name, path)
        save_file(cpu_tensors, tmp_name, metadata=header)
        with open(tmp_name, "rb+") as tmp:
            os.fsync(tmp.fileno())
        if _save_hook is not None:
            _save_hook("written", tmp_name, path)
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes it private; a checkpoint is an ordinary file
        os.replace(tmp_name, path)
    except BaseException:
        os.unlink(tmp_name)
        raise
    _fsync_directory(directory)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed ``save_checkpoint(path, ...)`` calls
    left next to ``path``; returns them. Call it only while nothing is saving to
    ``path`` (e.g. when a run starts)."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
    for name in stale:
        name.unlink(missing_ok=True)
    return stale


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself; not every platform can open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by ``save_checkpoint``: returns ``(tensors, metadata)``.

    Raises FileNotFoundError if ``path`` is missing and CheckpointError if it
    is not a readable safetensors file carrying our metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        metadata = json.loads(header[METADATA_KEY])
    except KeyError:
        raise CheckpointError(f"{path} is a safetensors file without cdm metadata") from None
    except (SafetensorError, ValueError, OSError) as err:
        raise CheckpointError(f"corrupt or unreadable checkpoint {path}: {err}") from err
    return tensors, metadata


def check_metadata(found: dict[str, Any], expected: dict[str, Any], what: str = "checkpoint") -> None:
    """Raise ValueError listing every key of ``expected`` whose value differs in ``found``.

    Use it before loading weights, e.g. ``check_metadata(meta["config"],
    asdict(model.config))``, so a mismatch names the offending settings
    instead of surfacing as a tensor shape error.
    """
    missing = object()
    mismatches = [f"{key}: {what} has {found.get(key, '<missing>')!r}, expected {value!r}"
                  for key, value in expected.items() if found.get(key, missing) != value]
    if mismatches:
        raise ValueError(f"{what} metadata does not match: " + "; ".join(mismatches))


def shape_mismatches(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str:
    """The tensors whose shape differs from the same name's in ``expected`` (a
    model's ``state_dict()``), as "name (found) -> (expected), ..." (the first
    three, then a count); "" when none does."""
    wrong = [f"{name} {tuple(value.shape)} -> {tuple(expected[name].shape)}"
             for name, value in tensors.items() if name in expected and value.shape != expected[name].shape]
    return ", ".join(wrong[:3]) + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
