"""The run folder: the one place that reads and writes it.

A run folder ``<out_dir>/<run_name>/`` holds::

    config.json        the resolved Config, the method's resolved Args, the suite spec
    log.csv            one row every log_every / val_every iterations (step, lr, losses, val_dice)
    last.pt, best.pt   checkpoints (last: everything a resume needs; best: the weights chosen on val)
    metrics.json       best step, best validation Dice, timings, test summary (written at the end)
    test_cases.json    per-case test rows (and test_cases.csv)

Checkpoints hold plain data only (tensors, numbers, strings, lists, dicts): the config as a dict and
every random generator state as lists and tensors. They are written atomically and read with
``torch.load(weights_only=True)``, so a crafted checkpoint cannot run code: it is refused with a
``ValueError`` naming the file.

Example:
    >>> run = Run("runs/fetal_head-bcp-b6-s0")                 # doctest: +SKIP
    >>> run.metrics["test"]["dice"]["mean"], run.log[-1]["step"]  # doctest: +SKIP
    >>> method = run.load_method()                              # doctest: +SKIP
"""
from __future__ import annotations

import csv
import io
import json
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .atomic import atomic_open, write_text_atomic
from .config import Config, config_from_dict

LAST, BEST = "last.pt", "best.pt"
STAGE_BEST = "stage_best.pt"  # best-on-validation weights of the current stage (methods with stages)


def save_checkpoint(obj: dict, path: str | os.PathLike) -> Path:
    """Write a checkpoint atomically (temporary file, fsync, rename).

    Args:
        obj: plain data only (tensors, numbers, strings, None, lists, tuples, dicts), so that
            :func:`load_checkpoint` can read it without unpickling arbitrary objects.
        path: the checkpoint file.

    Raises:
        OSError: the write failed (e.g. a full disk); names ``path`` and the cause; no temporary
            file is left behind and an earlier checkpoint at ``path`` is kept.
    """
    with atomic_open(path) as f:
        torch.save(obj, f)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, with ``weights_only=True`` only.

    Raises:
        ValueError: the file is missing, corrupt, not a dict, or holds objects other than plain
            data (a pickle that would import or call something is refused, never executed).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} not found")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"checkpoint {path} is not a readable torch checkpoint (expected a file written by "
                         f"torch.save; it may be truncated or of another format)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [l.strip() for l in str(err).splitlines() if "GLOBAL" in l or "Unsupported" in l]
        raise ValueError(f"checkpoint {path} holds objects other than tensors and plain data and was refused, "
                         f"nothing in it was run ({lines[0] if lines else 'weights_only=True refused it'})") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"checkpoint {path} is not a readable torch checkpoint: {err}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path}: expected a dict, got {type(obj).__name__}")
    return obj


def rng_state(generator: torch.Generator) -> dict:
    """Every random state of the process plus ``generator``'s, as plain data (lists and tensors)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state(), "method": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(generator: torch.Generator, state: dict) -> None:
    """Restore what :func:`rng_state` returned (the process's generators and ``generator``)."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["method"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _number(text: str) -> Any:
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


class Run:
    """A run folder: its config, log, metrics, per-case test rows and trained method.

    Args:
        path: the run folder (``<out_dir>/<run_name>``); it must hold ``config.json``.

    Raises:
        ValueError: ``path`` is not a folder holding ``config.json``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ValueError(f"{self.path} is not a run folder: expected {self.path / 'config.json'} "
                             f"(a folder written by `minissl train`)")

    @classmethod
    def create(cls, path: str | os.PathLike, cfg: Config, extra: Optional[dict] = None) -> "Run":
        """Make the folder (if needed), remove temporaries of a write that was killed, and write
        ``config.json`` (``cfg`` plus ``extra``)."""
        for stale in Path(path).glob(".*.tmp*"):
            stale.unlink(missing_ok=True)
        cfg.to_json(Path(path) / "config.json", extra)
        return cls(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def _json(self, name: str) -> Any:
        p = self.path / name
        if not p.is_file():
            raise ValueError(f"{p} not found: the run has not finished (or was not tested)")
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{p}: not valid JSON ({err})") from None

    @property
    def saved(self) -> dict:
        """``config.json`` as written: the Config fields plus ``method_resolved`` and ``suite_spec``."""
        return self._json("config.json")

    @property
    def config(self) -> Config:
        """The run's Config (from ``config.json``)."""
        return config_from_dict(self.saved, where=str(self.path / "config.json"))

    @property
    def method_name(self) -> str:
        """The registry name of the run's method."""
        return self.config.method

    @property
    def log(self) -> list[dict]:
        """Rows of ``log.csv``: ``step`` an int, other numbers floats, blank cells None."""
        p = self.path / "log.csv"
        if not p.is_file():
            return []
        with open(p, newline="") as f:
            rows = list(csv.DictReader(f))
        out = []
        for r in rows:
            row = {k: _number(v) for k, v in r.items()}
            out.append({k: (float(v) if isinstance(v, int) and k != "step" else v) for k, v in row.items()})
        return out

    def write_log(self, rows: list[dict]) -> None:
        """Write ``log.csv`` atomically (columns: step first, then the others sorted)."""
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.path / "log.csv", buf.getvalue())

    @property
    def metrics(self) -> dict:
        """``metrics.json``: best_step, best_val_dice, seconds_per_iter, test summary."""
        return self._json("metrics.json")

    def write_metrics(self, metrics: dict) -> None:
        """Write ``metrics.json`` atomically (the run is then finished)."""
        write_text_atomic(self.path / "metrics.json", json.dumps(metrics, indent=2))

    @property
    def test_rows(self) -> list[dict]:
        """Per-case test rows (``test_cases.json``), see :mod:`minissl.evaluate`."""
        return self._json("test_cases.json")["rows"]

    @property
    def finished(self) -> bool:
        """True once the run was tested (``metrics.json`` exists)."""
        return (self.path / "metrics.json").is_file()

    def checkpoint(self, name: str = LAST, map_location: Any = "cpu") -> dict:
        """A checkpoint of the run (see :func:`load_checkpoint`)."""
        return load_checkpoint(self.path / name, map_location)

    def suite_spec(self) -> Any:
        """The suite spec the run was trained with (saved in ``config.json``)."""
        from .data.store import SuiteSpec

        saved = self.saved
        if "suite_spec" not in saved:
            raise ValueError(f"{self.path / 'config.json'}: expected a 'suite_spec' entry, found none")
        return SuiteSpec.from_dict(saved["suite_spec"])

    def load_method(self, checkpoint: str = BEST, device: str | torch.device = "cpu") -> Any:
        """The run's method with the weights of ``checkpoint``, on ``device``, in eval mode.

        Raises:
            ValueError: the checkpoint is missing, refused, or does not fit the method's networks.
        """
        from .methods import get_method

        cfg = self.config
        method = get_method(cfg.method)(cfg, self.suite_spec())
        state = self.checkpoint(checkpoint, map_location=device)
        load_state(method, state, self.path / checkpoint)
        return method.to(device).eval()


def load_state(method: torch.nn.Module, ckpt: dict, path: str | os.PathLike) -> None:
    """Load ``ckpt["method"]`` into ``method``; a mismatch is a ValueError naming the file and the method."""
    if "method" not in ckpt:
        raise ValueError(f"checkpoint {path}: expected a 'method' entry, found keys {sorted(ckpt)}")
    try:
        method.load_state_dict(ckpt["method"])
    except RuntimeError as err:
        detail = str(err).splitlines()[0]
        raise ValueError(f"checkpoint {path} does not fit method {getattr(method, 'name', type(method).__name__)!r} "
                         f"with this configuration ({detail})") from None


__all__ = ["BEST", "LAST", "Run", "load_checkpoint", "load_state", "rng_state", "save_checkpoint", "set_rng_state"]
