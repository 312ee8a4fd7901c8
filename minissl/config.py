"""Typed run configuration: defaults here, overrides from a YAML/JSON file and from ``--key value``.

Every schedule is a fraction of ``max_iters`` (``rampup=0.4`` means "the consistency weight reaches
its full value after 40 % of the run"), so a 600-iteration CPU run and a 30,000-iteration GPU run
follow the same curve; the published recipes are files in ``configs/``.

Method-specific hyper-parameters live in each method's own ``Args`` dataclass
(``minissl/methods/*.py``); here they are collected in ``method_args`` and resolved by the method.
The resolved configuration (these fields plus the method's resolved ``Args``) is saved as
``config.json`` beside every run.

Example:
    >>> cfg = load_config(overrides=["--method", "mean_teacher", "--max_iters", "300"])
    >>> cfg.max_iters
    300
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence


@dataclass
class Config:
    """One run of one method on one suite (every field can be overridden by ``--field value``)."""

    # --- what to train
    method: str = "supervised"  # registry name, see `minissl methods`
    suite: str = "fetal_head"  # embedded suite name (used when data_root is None)
    data_root: Optional[str] = None  # a store or SSL4MIS folder; None = the embedded suite's cache
    budget: Optional[int] = None  # labeled training cases (patients); None = the suite's default (10 %)
    seed: int = 0  # seeds the network init, the batches, the budget draw and the method's RNG
    # --- optimisation
    max_iters: Optional[int] = None  # None = the suite's default
    batch_size: int = 8  # images per step, labeled + unlabeled
    labeled_bs: int = 4  # labeled images per step (supervised methods use only these)
    lr: float = 0.01  # initial SGD learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # SGD weight decay
    lr_schedule: str = "poly"  # poly: lr (1 - t)^0.9 | cosine | constant ; t = iter / max_iters
    # --- network
    width: int = 8  # channels of the first UNet level (doubles per level); CPU-sized, GPU recipes use 16
    depth: int = 4  # number of down-samplings
    # --- shared semi-supervised knobs (methods read them through the base class)
    ema_decay: float = 0.99  # EMA teacher decay
    cons_weight: float = 0.1  # final weight of the unlabeled loss
    rampup: float = 0.4  # sigmoid ramp-up length of the unlabeled weight, fraction of max_iters
    method_args: dict = field(default_factory=dict)  # method-specific overrides (the method's Args)
    # --- protocol and output
    val_every: Optional[int] = None  # validate (and maybe save best) every N iterations; None = max_iters // 10
    log_every: int = 10  # write a row to log.csv every N iterations
    out_dir: str = "runs"  # runs are written to out_dir/run_name
    run_name: Optional[str] = None  # None = "<suite>-<method>-b<budget>-s<seed>"
    device: str = "cpu"  # torch device string ("cpu", "cuda", "cuda:1")
    resume: bool = False  # continue the run in out_dir/run_name from its last checkpoint
    progress: bool = True  # show a progress bar

    def validate(self) -> "Config":
        """Check field values; raise ValueError naming the field, what was expected and what came."""
        if self.lr_schedule not in ("poly", "cosine", "constant"):
            raise ValueError(f"lr_schedule: expected one of poly, cosine, constant, got {self.lr_schedule!r}")
        if not 0 < self.labeled_bs <= self.batch_size:
            raise ValueError(f"labeled_bs: expected 0 < labeled_bs <= batch_size={self.batch_size}, got {self.labeled_bs}")
        if self.max_iters is not None and self.max_iters < 1:
            raise ValueError(f"max_iters: expected a positive integer, got {self.max_iters}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget: expected at least 1 labeled case, got {self.budget}")
        if not 0.0 <= self.rampup <= 1.0:
            raise ValueError(f"rampup: expected a fraction of max_iters in [0, 1], got {self.rampup}")
        return self

    def to_json(self, path: Path, extra: Optional[dict] = None) -> None:
        """Write the resolved config (plus ``extra``, e.g. the method's resolved Args) as JSON."""
        data = asdict(self) | (extra or {})
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=True))


def _parse_value(text: str, annotation: str) -> Any:
    """Convert a command-line string to the field's type (from its annotation string)."""
    if text.lower() in ("none", "null") and "Optional" in annotation:
        return None
    if annotation.startswith("Optional["):
        annotation = annotation[len("Optional["):-1]
    if annotation == "bool":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {text!r}")
    if annotation == "int":
        return int(text)
    if annotation == "float":
        return float(text)
    if annotation == "dict":
        return json.loads(text)
    return text


def _read_file(path: str) -> dict:
    """Read overrides from a .json or .yaml/.yml file."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"config file {p} does not exist")
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(p.read_text()) or {}
    elif p.suffix == ".json":
        data = json.loads(p.read_text())
    else:
        raise ValueError(f"config file {p}: expected a .json, .yaml or .yml file, got {p.suffix!r}")
    if not isinstance(data, dict):
        raise ValueError(f"config file {p}: expected a mapping of field -> value, got {type(data).__name__}")
    return data


def load_config(file: Optional[str] = None, overrides: Sequence[str] = (), **kwargs: Any) -> Config:
    """Build a Config from defaults, then a file, then ``--key value`` pairs, then keyword arguments.

    Keys that are not Config fields go to ``method_args`` (checked later against the method's Args),
    so ``--threshold 0.9`` sets the method's threshold. ``--method_args.threshold 0.9`` works too.

    Args:
        file: optional .json/.yaml file with a mapping of overrides.
        overrides: command-line tokens like ``["--method", "mean_teacher", "--max_iters", "300"]``.
        **kwargs: programmatic overrides (highest priority).

    Returns:
        The validated Config.
    """
    known = {f.name: str(f.type) for f in fields(Config)}
    values: dict[str, Any] = {}
    method_args: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        key = key.replace("-", "_")
        if key.startswith("method_args."):
            method_args[key.split(".", 1)[1]] = value
        elif key == "method_args":
            method_args.update(value)
        elif key in known:
            values[key] = value
        else:
            method_args[key] = value

    if file:
        for k, v in _read_file(file).items():
            put(k, v)
    tokens = list(overrides)
    if len(tokens) % 2:
        raise ValueError(f"overrides: expected --key value pairs, got an odd number of tokens: {tokens}")
    for key, text in zip(tokens[::2], tokens[1::2]):
        if not key.startswith("--"):
            raise ValueError(f"overrides: expected a --key, got {key!r}")
        name = key[2:].replace("-", "_")
        if name in known:
            try:
                values[name] = _parse_value(text, known[name])
            except ValueError as err:
                raise ValueError(f"--{name}: {err}") from None
        else:
            put(name, _auto_value(text))
    for k, v in kwargs.items():
        put(k, v)
    cfg = Config(**values)
    cfg.method_args = {**cfg.method_args, **method_args}
    return cfg.validate()


def _auto_value(text: str) -> Any:
    """Best-effort typing of a method argument given on the command line (JSON first, else str)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def resolve_args(args_cls: type, given: dict, method: str) -> Any:
    """Instantiate a method's Args dataclass from ``given``, rejecting unknown keys by name."""
    names = {f.name: f for f in fields(args_cls)}
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method {method!r}: expected Config fields or one of "
            f"{sorted(names) or 'no method options'}"
        )
    out = {}
    for k, v in given.items():
        default = getattr(args_cls, k, None) if not isinstance(names[k].default, dataclasses._MISSING_TYPE) else None
        out[k] = type(default)(v) if isinstance(default, (int, float)) and not isinstance(default, bool) else v
    return args_cls(**out)
