"""Checkpoints of a ``loop.fit`` run: written atomically, resumed exactly, refused when the settings differ.

Exact resume needs more than the weights: the optimizer's moments and the GradScaler's scale, the step (the lr
schedule is a pure function of it), every RNG a step function may draw from (the loop's shuffling generator,
torch's global CPU and CUDA generators, numpy's and python's), the permutation of the epoch in progress and the
position in it, that epoch's running loss, the history and the best epoch so far (the patience counter is the
distance to it). Only trainable parameters and buffers are saved ("model deltas"): a frozen backbone is the
client's to rebuild, not to copy every epoch.

One file, ``checkpoint.pt``, in the directory the client passes, replaced through ``atomic_open``: a process killed
at any moment leaves the previous checkpoint readable. It records the settings of its run (everything that changes
the result), so a resume under other settings fails before any work, naming the values that differ. A finished
run leaves a last checkpoint marked ``complete``; resuming it returns the finished result and never trains more.

A data-parallel run's checkpoint is written by rank 0 alone; everything but the RNGs and the running loss is the same
on every rank, so those come as one entry per rank under ``ranks`` (rank r resumes from ``ranks[r]``), and the run's
number of processes is among the settings (``world``, absent for one process).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_open
from ..errors import EncoderlabError

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = 1
FIX = "pass a new --out or --no-resume (resume=False) to start over"


def work_dir(model_dir: str | os.PathLike) -> Path:
    """The sibling ``.NAME.train/`` scratch directory of a model directory: checkpoints live there, not in it."""
    path = Path(os.path.abspath(model_dir))
    return path.parent / f".{path.name}.train"


def trainable_state(model: torch.nn.Module, *, clone: bool = False) -> dict[str, torch.Tensor]:
    """The state-dict entries training changes: parameters with ``requires_grad`` and buffers (e.g. norm stats)."""
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v.clone() if clone else v for k, v in model.state_dict().items() if k not in frozen}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a ``trainable_state`` back; names the model lacks are a caller's bug (the settings check passed)."""
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"checkpoint state has entries the model lacks: {unexpected[:5]}")


def rng_states(loop_gen: torch.Generator) -> dict[str, Any]:
    """Every RNG state a step may depend on (numpy's as a tensor: checkpoints load with ``weights_only``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "loop": loop_gen.get_state(), "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss), "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any], loop_gen: torch.Generator) -> None:
    """Restore ``rng_states``; CUDA states only where CUDA is present (a CPU resume of a GPU run draws anew)."""
    loop_gen.set_state(states["loop"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])


def plain(value: Any) -> Any:
    """JSON-like python values (tuples become lists), so saved and expected settings compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def save(directory: Path, payload: dict[str, Any]) -> None:
    """Replace the checkpoint atomically: a kill mid-write leaves the previous one intact (and a stray temp file)."""
    with atomic_open(directory / CHECKPOINT_NAME) as f:
        torch.save({"format": FORMAT, **payload}, f)


def load(directory: Path, *, mmap: bool = False) -> dict[str, Any] | None:
    """The checkpoint in ``directory``, or None; ``mmap`` reads tensors lazily (a cheap look at the settings)."""
    path = directory / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises RuntimeError, pickle errors, EOFError ... for a damaged file
        reason = (str(e).strip().splitlines() or [""])[0][:100]  # torch's messages run to many lines
        raise EncoderlabError(f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {reason})", FIX) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise EncoderlabError(f"checkpoint {str(path)!r} is not a format-{FORMAT} encoderlab checkpoint", FIX)
    return ckpt


def check_settings(ckpt: dict[str, Any], expected: dict[str, Any], directory: Path) -> None:
    """Fail unless the checkpoint's run had the ``expected`` settings (only the keys given are compared)."""
    diffs = _differences(ckpt["settings"], plain(expected))
    if diffs:
        raise EncoderlabError(f"checkpoint in {str(directory)!r} was written by a run with different settings "
                              f"(checkpoint vs this run: {', '.join(diffs)})", FIX)


def check_resumable(directory: Path, expected: dict[str, Any]) -> None:
    """A client's early check, before it extracts features or builds models: the fit would resume or start anew."""
    ckpt = load(directory, mmap=True)
    if ckpt is not None:
        check_settings(ckpt, expected, directory)


def remove(directory: Path) -> None:
    """Delete the checkpoint and any temp file a killed write left (the directory's own files only)."""
    with contextlib.suppress(FileNotFoundError):
        (directory / CHECKPOINT_NAME).unlink()
    remove_stale_temps(directory)


def remove_stale_temps(directory: Path) -> None:
    """Temp files of writes killed before their rename: never readable checkpoints, only clutter."""
    for path in directory.glob(f".{CHECKPOINT_NAME}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _differences(saved: Any, expected: Any, name: str = "settings") -> list[str]:
    """``"lr 0.001 vs 0.0005"`` for each value that differs (checkpoint's first), walking nested dicts."""
    if isinstance(saved, dict) and isinstance(expected, dict):
        out: list[str] = []
        for key, value in expected.items():
            for diff in _differences(saved.get(key, "<missing>"), value, key):
                if diff not in out:  # the same setting can reach the loop and the client's config
                    out.append(diff)
        return out
    return [] if saved == expected else [f"{name} {_show(saved)} vs {_show(expected)}"]


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 24 else text[:20] + "..."
