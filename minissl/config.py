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

import difflib
import inspect
import io
import json
import math
import tokenize
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .atomic import write_text_atomic


@dataclass
class Config:
    """One run of one method on one suite (every field can be overridden by ``--field value``)."""

    # --- what to train
    method: str = "supervised"  # registry name, see `minissl methods`
    suite: str = "fetal_head"  # embedded suite name (used when data_root is None)
    data_root: Optional[str] = None  # a store or SSL4MIS folder; None = the embedded suite's cache
    suites: str = ""  # several suites or folders trained together, comma-separated, one task each (VerSemi)
    budget: Optional[int] = None  # labeled training cases (patients); None = the suite's default (10 %)
    budget_kind: str = "cases"  # cases | slices:k (every k-th slice along axis 0 of a labeled case annotated)
    seed: int = 0  # seeds the network init, the batches, the budget draw and the method's RNG
    # --- optimisation
    max_iters: Optional[int] = None  # None = the suite's default
    batch_size: int = 8  # images per step, labeled + unlabeled
    labeled_bs: int = 4  # labeled images per step (supervised methods use only these)
    lr: float = 0.01  # initial SGD learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # SGD weight decay
    lr_schedule: str = "poly"  # poly: lr (1 - t)^0.9 | cosine | constant ; t = iter / max_iters
    recipe: str = "shared"  # shared (the four fields above) | official (the method's code) | official:<method>
    # --- network
    width: int = 8  # channels of the first UNet level (doubles per level); CPU-sized, GPU recipes use 16
    depth: int = 4  # number of down-samplings
    # --- shared semi-supervised knobs (methods read them through the base class)
    ema_decay: Optional[float] = None  # EMA teacher decay; None = each method's ema_horizon (a fraction of the run)
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
    resume_override: str = ""  # fields allowed to differ on --resume, comma-separated (val_every,log_every,device,data_root)
    progress: bool = True  # show a progress bar

    @property
    def data_source(self) -> str:
        """What ``data.sources.open_data`` opens: ``suites`` if given, else ``data_root``, else ``suite``."""
        return self.suites or self.data_root or self.suite

    def validate(self) -> "Config":
        """Coerce every field to its type and check its range (in place).

        Raises:
            FieldError: (a ValueError) naming the field, what was expected and what came.
        """
        for f in fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name), f.type, finite=False))
        for name, (ok, expected) in RANGES.items():
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise FieldError(name, expected, value)
        if self.labeled_bs > self.batch_size:
            raise FieldError("labeled_bs", f"0 < labeled_bs <= batch_size={self.batch_size}", self.labeled_bs)
        return self

    def to_json(self, path: str | Path, extra: Optional[dict] = None) -> None:
        """Write the resolved config (plus ``extra``, e.g. the method's resolved Args) as JSON, atomically."""
        write_text_atomic(path, json.dumps(asdict(self) | (extra or {}), indent=2, sort_keys=True))


class FieldError(ValueError):
    """A bad value of one field: ``"<field>: expected <what>, got <value>"``."""

    def __init__(self, name: str, expected: str, got: Any):
        self.field, self.expected, self.got = name, expected, got
        super().__init__(f"{name}: expected {expected}, got {got!r}")


def _run_name_ok(name: str) -> bool:
    p = Path(name)
    return bool(name.strip()) and not p.is_absolute() and ".." not in p.parts and not name.startswith("~")


def _device_ok(name: str) -> bool:
    import torch

    try:
        return torch.device(name).type in ("cpu", "cuda", "mps")
    except (RuntimeError, ValueError):
        return False


def _budget_kind_ok(kind: str) -> bool:
    from .data.store import slice_step

    try:
        slice_step(kind)
    except ValueError:
        return False
    return True


def _finite(v: float) -> bool:
    return math.isfinite(v)


SAFE_OVERRIDES = ("val_every", "log_every", "device", "data_root")  # may differ on a resume when named

RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {  # field -> (check, what is expected)
    "method": (lambda v: bool(v.strip()), "a method name (see `minissl methods`)"),
    "suite": (lambda v: bool(v.strip()), "a suite name"),
    "budget": (lambda v: v >= 1, "at least 1 labeled case"),
    "budget_kind": (_budget_kind_ok, "cases or slices:<k> (every k-th slice annotated, k >= 1)"),
    "seed": (lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2**32)"),
    "max_iters": (lambda v: v >= 1, "a positive integer"),
    "batch_size": (lambda v: v >= 1, "a positive integer"),
    "labeled_bs": (lambda v: v >= 1, "0 < labeled_bs <= batch_size"),
    "lr": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "lr_schedule": (lambda v: v in ("poly", "cosine", "constant"), "one of poly, cosine, constant"),
    "recipe": (lambda v: v in ("shared", "official") or (v.startswith("official:") and len(v) > 9),
               "shared, official or official:<method>"),
    "width": (lambda v: v >= 1, "a positive integer (channels)"),
    "depth": (lambda v: v >= 1, "a positive integer (down-samplings)"),
    "ema_decay": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "cons_weight": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "rampup": (lambda v: 0 <= v <= 1, "a fraction of max_iters in [0, 1]"),
    "val_every": (lambda v: v >= 1, "a positive integer (or none)"),
    "log_every": (lambda v: v >= 1, "a positive integer"),
    "out_dir": (lambda v: bool(v.strip()), "a folder"),
    "run_name": (_run_name_ok, "a folder name inside out_dir (relative, without '..')"),
    "device": (_device_ok, 'a torch device ("cpu", "cuda", "cuda:1", "mps")'),
    "resume_override": (lambda v: all(n in SAFE_OVERRIDES for n in v.split(",") if n.strip()),
                        f"comma-separated names among {', '.join(SAFE_OVERRIDES)}"),
}


def type_name(annotation: Any) -> str:
    """``"Optional[int]"`` for a string annotation or a type (``int`` -> ``"int"``)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return text.replace("typing.", "")


def coerce(name: str, value: Any, annotation: Any, finite: bool = True) -> Any:
    """``value`` converted to the field type ``annotation`` (bool, int, float, str, dict, Optional[...]).

    Strings (the command line, YAML's ``1e-3``) are parsed; an integral float is an int; a bool is never
    a number; floats must be finite unless ``finite=False`` (a range check follows).

    Raises:
        FieldError: the value cannot be read as that type.
    """
    kind = type_name(annotation)
    optional = kind.startswith("Optional[")
    kind = kind[len("Optional["):-1] if optional else kind
    if isinstance(value, str) and optional and value.strip().lower() in ("none", "null", ""):
        return None
    if value is None:
        if optional:
            return None
        raise FieldError(name, f"a value of type {kind}", value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise FieldError(name, "a boolean (true/false)", value)
    if kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise FieldError(name, "an integer" if kind == "int" else "a number", value)
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise FieldError(name, "an integer" if kind == "int" else "a number", value) from None
        if kind == "float":
            if finite and not math.isfinite(number):
                raise FieldError(name, "a finite number", value)
            return float(number)
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        if not math.isfinite(number) or number != int(number):
            raise FieldError(name, "an integer", value)
        return int(number)
    if kind == "dict":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise FieldError(name, 'a JSON object such as \'{"threshold": 0.9}\'', value) from None
        if not isinstance(value, dict):
            raise FieldError(name, 'a mapping such as {"threshold": 0.9}', value)
        return dict(value)
    if kind == "str":
        if not isinstance(value, str):
            raise FieldError(name, "a string", value)
        return value
    return value


def field_help(cls: type) -> dict[str, str]:
    """The one-line comment after each field of the dataclass ``cls`` (read from its source)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    names, out, line_field = {f.name for f in fields(cls)}, {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names:
            line_field[tok.start[0]] = tok.string
        elif tok.type == tokenize.COMMENT and tok.start[0] in line_field:
            out[line_field[tok.start[0]]] = tok.string.lstrip("#").strip()
    return out


def closest(name: str, candidates: Sequence[str], prefix: str = "--") -> str:
    """``" (did you mean --a, --b?)"`` for the closest ``candidates`` to ``name``, or ``""``."""
    near = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(prefix + n for n in near)}?)" if near else ""


def _read_file(path: str) -> dict:
    """Read overrides from a .json or .yaml/.yml file (parse errors name the file and the line)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {p} does not exist")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"config file {p}: not valid YAML{where}: {problem}") from None
    elif p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {p}: not valid JSON at line {err.lineno}, column {err.colno}: "
                             f"{err.msg}") from None
    else:
        raise ValueError(f"config file {p}: expected a .json, .yaml or .yml file, got {p.suffix!r}")
    if not isinstance(data, dict):
        raise ValueError(f"config file {p}: expected a mapping of field -> value, got {type(data).__name__}")
    return data


def load_config(file: Optional[str] = None, overrides: Sequence[str] = (), **kwargs: Any) -> Config:
    """Build a Config from defaults, then a file, then ``--key value`` pairs, then keyword arguments.

    Keys that are not Config fields go to ``method_args`` (checked later against the method's Args),
    so ``--threshold 0.9`` sets the method's threshold. ``--method_args.threshold 0.9`` works too.
    Every value is typed and range-checked here, before anything is created.

    Args:
        file: optional .json/.yaml file with a mapping of overrides.
        overrides: command-line tokens like ``["--method", "mean_teacher", "--max_iters", "300"]``.
        **kwargs: programmatic overrides (highest priority).

    Returns:
        The validated Config.

    Raises:
        ValueError: naming the file or option, the field, what was expected and what came.
    """
    known = {f.name for f in fields(Config)}
    values: dict[str, Any] = {}
    method_args: dict[str, Any] = {}
    origin: dict[str, str] = {}  # field -> where its value came from (for the error message)

    def put(key: str, value: Any, source: str) -> None:
        key = key.replace("-", "_")
        if key.startswith("method_args."):
            method_args[key.split(".", 1)[1]] = value
        elif key == "method_args":
            origin["method_args"] = source
            method_args.update(coerce("method_args", value, "dict"))
        elif key in known:
            values[key], origin[key] = value, source
        else:
            method_args[key] = value

    try:
        if file:
            for k, v in _read_file(file).items():
                put(str(k), v, f"config file {file}: ")
        tokens = list(overrides)
        if len(tokens) % 2:
            raise ValueError(f"overrides: expected --key value pairs, got an odd number of tokens: {tokens}")
        for key, text in zip(tokens[::2], tokens[1::2]):
            if not key.startswith("--"):
                raise ValueError(f"overrides: expected a --key, got {key!r}")
            name = key[2:].replace("-", "_")
            put(name, text if name in known else _auto_value(text), "--")
        for k, v in kwargs.items():
            put(k, v, "")
        cfg = Config(**values)
        cfg.method_args = {**coerce("method_args", cfg.method_args, "dict"), **method_args}
        return cfg.validate()
    except FieldError as err:
        raise ValueError(f"{origin.get(err.field, '')}{err}") from None


def config_from_dict(data: dict, where: str = "config") -> Config:
    """A validated Config from a saved dict (``config.json``; keys that are not fields are ignored)."""
    try:
        return Config(**{k: v for k, v in data.items() if k in Config.__dataclass_fields__}).validate()
    except (FieldError, TypeError) as err:
        raise ValueError(f"{where}: {err}") from None


def _auto_value(text: str) -> Any:
    """Best-effort typing of a method argument given on the command line (JSON first, else str)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def resolve_args(args_cls: type, given: dict, method: str) -> Any:
    """Instantiate a method's Args dataclass from ``given``: unknown keys are refused with the closest
    valid names, values are typed like the field's default (numbers finite) as Config fields are.

    Raises:
        ValueError: naming the method, the option, what was expected and what came.
    """
    if not isinstance(given, dict):
        raise ValueError(f"method_args: expected a mapping such as {{\"threshold\": 0.9}}, got {given!r}")
    names = {f.name: f for f in fields(args_cls)}
    for key in sorted(set(given) - set(names)):
        hint = closest(key, [*names, *Config.__dataclass_fields__])
        raise ValueError(f"unknown option --{key} for method {method!r}{hint}: expected a Config field "
                         f"or one of the method's options {sorted(names) or '(it has none)'}")
    out = {}
    for k, v in given.items():
        try:
            out[k] = coerce(k, v, names[k].type)
        except FieldError as err:
            raise ValueError(f"method {method!r}: --{err}") from None
    return args_cls(**out)
