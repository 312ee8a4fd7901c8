"""``minissl bench step``: how long one training step of each method takes, and where the time goes.

Three variants of the step (:mod:`minissl.runtime`): ``plain`` (``MINISSL_PLAIN_STEP=1``, no speed
settings), ``contiguous`` (the default without the channels-last layout, ``MINISSL_CHANNELS_LAST=0``) and
``default`` (what ``minissl train`` runs), each with the compiled kernels and with the pure-PyTorch
reference ops (``MINISSL_NO_EXT=1``; the 2D default then keeps the contiguous layout). Every configuration runs in a fresh process (the allocator settings are
process-wide), at ``--threads`` threads, and the repetitions are interleaved (repetition 1 of every
configuration, then repetition 2, ...), so a slow patch of a shared machine hits all of them alike; the
ratio plain / variant is taken within each repetition, then its median.

In each process, per method: the suite's model and optimiser as ``minissl train`` builds them, the
batches of its loader from the middle of the run (``--at``, a fraction of max_iters, so that stages and
ramps are in their main phase), ``--warmup`` untimed steps, then ``--iters`` timed ones. A step is
``next(loader)`` plus ``method.update``. Its parts are timed from outside the method code, by wrapping
the functions it calls (each second counted once, in the innermost part):

    forward      UNet.encode / UNet.decode (every network pass, teachers included)
    backward     torch.autograd.backward
    optimiser    the optimisers' step
    loss         the functions of minissl.losses and ops.dice_ce_entropy
    mixing       ops.mix
    post         pseudo-label post-processing: ops.largest_component, fit_ellipse, ellipse_mask, ellipse_refine
    after_step   Method.after_step (EMA updates)
    other        the rest of update (zero_grad, noise, argmax, concatenation, Python)
    data         next(loader)

Memory (``--memory D,H,W``): the peak RSS of ``--steps`` training steps of each method at that patch size,
above the RSS once its model and optimisers are built (:data:`minissl.runtime.PEAK_FROM`, the baseline of a
run's ``peak_rss_mb``), each method in a fresh process with the default step, and whether it stays within
``--limit_gib``. The suite's images are cropped or padded to the patch, so any 3D suite gives the shape.

Examples::

    minissl bench step --suite cardiac --methods supervised,mean_teacher,bcp --iters 20 --threads 1
    minissl bench step --suite atrium --memory 80,112,112 --methods all --batch_size 4 --labeled_bs 2 --width 16
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

PARTS = ("forward", "backward", "optimiser", "loss", "mixing", "post", "after_step", "other", "data")
VARIANTS = {"plain": {"MINISSL_PLAIN_STEP": "1"},  # the environment of each variant of the step
            "contiguous": {"MINISSL_PLAIN_STEP": "0", "MINISSL_CHANNELS_LAST": "0"},
            "default": {"MINISSL_PLAIN_STEP": "0", "MINISSL_CHANNELS_LAST": ""}}
KERNELS = ("kernels", "reference")  # compiled ops, MINISSL_NO_EXT=1
POST_OPS = ("largest_component", "fit_ellipse", "ellipse_mask", "ellipse_refine")


class Clock:
    """Exclusive time per part: a part entered inside another stops the outer one's clock."""

    def __init__(self):
        self.seconds: Counter = Counter()
        self._stack: list[str] = []
        self._mark = 0.0

    def enter(self, part: str) -> None:
        now = time.perf_counter()
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._mark
        self._stack.append(part)
        self._mark = now

    def leave(self) -> None:
        now = time.perf_counter()
        self.seconds[self._stack.pop()] += now - self._mark
        self._mark = now

    def wrap(self, fn: Callable, part: str) -> Callable:
        """``fn`` with its time counted in ``part``."""
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.enter(part)
            try:
                return fn(*args, **kwargs)
            finally:
                self.leave()

        return timed


@contextlib.contextmanager
def instrument(method: Any, optimizers: Sequence[torch.optim.Optimizer], clock: Clock) -> Iterator[None]:
    """Count the parts of ``method.update`` in ``clock`` (see the module docstring); restored on exit."""
    from . import losses, ops
    from .nets.unet import UNet

    targets = [(UNet, name, "forward") for name in ("encode", "decode")]
    targets += [(torch.autograd, "backward", "backward"), (ops, "mix", "mixing"), (ops, "dice_ce_entropy", "loss")]
    targets += [(ops, name, "post") for name in POST_OPS]
    targets += [(losses, name, "loss") for name, fn in vars(losses).items()
                if inspect.isfunction(fn) and fn.__module__ == losses.__name__ and not name.startswith("_")]
    targets += [(opt, "step", "optimiser") for opt in optimizers] + [(method, "after_step", "after_step")]
    saved = [(owner, name, vars(owner).get(name)) for owner, name, _ in targets]  # None: inherited
    try:
        for owner, name, part in targets:
            setattr(owner, name, clock.wrap(getattr(owner, name), part))
        yield
    finally:
        for owner, name, own in reversed(saved):
            if own is None:
                delattr(owner, name)  # the instance falls back to its class's attribute again
            else:
                setattr(owner, name, own)


def build_step(method_name: str, suite: str, at: float = 0.5, data_root: Optional[str] = None,
               overrides: Sequence[str] = (), patch_size: Optional[Sequence[int]] = None
               ) -> tuple[Any, list[torch.optim.Optimizer], Iterator[dict], int]:
    """One method's model, optimisers and loader as ``minissl train`` builds them (with
    :func:`minissl.runtime.speed_up`, which ``MINISSL_PLAIN_STEP=1`` turns off), in training mode, the
    loader at step ``at * max_iters``; ``patch_size`` replaces the suite's.

    Returns:
        (method, optimizers, loader, first step).
    """
    from dataclasses import replace

    from . import runtime
    from .config import load_config
    from .data import datasets
    from .data.sources import open_data
    from .engine import resolve, seed_everything
    from .methods import get_method

    kw = {"data_root": data_root} if data_root else {}
    cfg = load_config(overrides=list(overrides), method=method_name, suite=suite, progress=False, **kw)
    store = open_data(cfg.data_source)
    cfg = resolve(cfg, store)
    if patch_size is not None and len(patch_size) != store.spec.spatial_dims:
        raise ValueError(f"patch_size: expected {store.spec.spatial_dims} sizes for suite {store.spec.name!r}, "
                         f"got {list(patch_size)}")
    spec = store.spec if patch_size is None else replace(store.spec, patch_size=tuple(patch_size))
    device = torch.device("cpu")
    seed_everything(cfg.seed)
    method = get_method(method_name)(cfg, spec).to(device)
    runtime.speed_up(method, spec.spatial_dims, device)
    optimizers = method.optimizers()
    start = int(at * cfg.max_iters)
    loader = datasets.make_train_loader(store, store.labeled(cfg.budget, cfg.seed), seed=cfg.seed,
                                        batch_size=cfg.batch_size, labeled_bs=cfg.labeled_bs,
                                        unlabeled=method.semi_supervised, start=start, patch_size=spec.patch_size)
    method.train()
    return method, optimizers, loader, start


def time_steps(method_name: str, suite: str, iters: int, warmup: int = 3, at: float = 0.5,
               data_root: Optional[str] = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Time ``iters`` training steps of one method in this process (after ``warmup`` untimed ones).

    The model, optimisers and loader are built as ``minissl train`` builds them (with
    :func:`minissl.runtime.speed_up`, which ``MINISSL_PLAIN_STEP=1`` turns off); the steps start at
    ``at * max_iters``.

    Returns:
        ``{"wall": [s per step], "cpu": [process CPU s per step], "parts": {part: mean s per step}}``.
    """
    method, optimizers, loader, start = build_step(method_name, suite, at, data_root, overrides)
    clock, wall, cpu = Clock(), [], []
    with instrument(method, optimizers, clock):
        for i in range(warmup + iters):
            if i == warmup:
                clock.seconds.clear()
            t0, c0 = time.perf_counter(), time.process_time()
            clock.enter("data")
            batch = next(loader)
            clock.leave()
            clock.enter("other")
            method.update(batch, start + i, optimizers)
            clock.leave()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"wall": wall[warmup:], "cpu": cpu[warmup:], "parts": {p: clock.seconds[p] / iters for p in PARTS}}


def step_memory(method_name: str, suite: str, shape: Sequence[int], steps: int = 2, at: float = 0.5,
                data_root: Optional[str] = None, overrides: Sequence[str] = ()) -> dict[str, float]:
    """Peak memory of ``steps`` training steps of one method in this process, at patch ``shape``.

    Built by :func:`build_step`, with the suite's patch size replaced by ``shape``.

    Returns:
        ``{"peak_mb": peak RSS minus RSS once model and optimisers are built, "built_mb": that RSS}``.
    """
    from . import runtime

    method, optimizers, loader, start = build_step(method_name, suite, at, data_root, overrides, shape)
    built = runtime.reset_peak_rss()
    for i in range(steps):
        method.update(next(loader), start + i, optimizers)
    return {"peak_mb": runtime.peak_rss_mb() - built, "built_mb": built}


def _child(spec: dict) -> dict:
    """One configuration's process: every method of ``spec``, timed in turn, and whether kernels ran."""
    from . import ops

    torch.set_num_threads(spec["threads"])
    if spec.get("memory"):
        (m,) = spec["methods"]  # one method per process: its peak is its own
        return {"methods": {m: step_memory(m, spec["suite"], spec["memory"], spec["steps"], spec["at"],
                                           spec["data_root"], spec["overrides"])},
                "kernels_loaded": ops.kernel_status().path is not None}
    out = {m: time_steps(m, spec["suite"], spec["iters"], spec["warmup"], spec["at"], spec["data_root"],
                         spec["overrides"]) for m in spec["methods"]}
    return {"methods": out, "kernels_loaded": ops.kernel_status().path is not None}


def run_configuration(variant: str, kernels: str, spec: dict) -> dict:
    """Run :func:`_child` in a fresh Python process with the environment of one configuration."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    env.update(VARIANTS[variant])
    env["MINISSL_NO_EXT"] = "1" if kernels == "reference" else "0"
    root = str(Path(__file__).resolve().parent.parent)  # this package, not another installed copy
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, "-m", "minissl.stepbench", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench step: the {variant} step with {kernels} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def render(results: dict, methods: Sequence[str], kernels: Sequence[str], spec: dict) -> str:
    """Markdown tables of :func:`bench_step`'s results: step times and ratios, then the parts."""
    lines = [f"**{spec['suite']}**: one training step, {spec['threads']} thread(s), {spec['iters']} timed steps "
             f"per repetition x {spec['repeats']} interleaved repetitions, from step {spec['at']:g} x max_iters", "",
             "| method | ops | clock | plain ms | contiguous ms (plain / it) | default ms (plain / default) |",
             "|---|---|---|---|---|---|"]
    for m in methods:
        for k in kernels:
            reps = results[k]
            for key, clock in (("wall", "wall"), ("cpu", "CPU")):
                med = {v: statistics.median([t for rep in reps[v] for t in rep[m][key]]) for v in VARIANTS}
                cells = [m, k, clock, _ms(med["plain"])]
                for v in ("contiguous", "default"):
                    ratio = statistics.median([statistics.median(p[m][key]) / statistics.median(q[m][key])
                                               for p, q in zip(reps["plain"], reps[v])])
                    cells.append(f"{_ms(med[v])} ({ratio:.2f}x)")
                lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Median over all timed steps; in brackets the median over repetitions of plain / variant (> 1: "
                  "faster than plain). CPU: process CPU time (user + system), less disturbed by other processes "
                  "than wall time.", "",
              "| method | ops | step | " + " | ".join(PARTS) + " |", "|" + "---|" * (len(PARTS) + 3)]
    for m in methods:
        for k in kernels:
            for v in VARIANTS:
                parts = {p: statistics.mean(rep[m]["parts"][p] for rep in results[k][v]) for p in PARTS}
                total = sum(parts.values())
                lines.append(f"| {m} | {k} | {v} | " + " | ".join(f"{100 * parts[p] / total:.0f} %" for p in PARTS)
                             + " |")
    lines += ["", "Share of the step's wall time per part (module docstring of minissl.stepbench), mean over "
                  "repetitions."]
    return "\n".join(lines) + "\n"


def bench_step(suite: str = "cardiac", methods: Sequence[str] = ("supervised", "mean_teacher", "bcp"),
               iters: int = 20, warmup: int = 3, repeats: int = 3, threads: int = 1, at: float = 0.5,
               kernels: Sequence[str] = KERNELS, data_root: Optional[str] = None,
               overrides: Sequence[str] = ()) -> str:
    """Time every variant of the step of each method, with and without kernels; return the tables.

    Args:
        kernels: which of "kernels" (compiled ops) and "reference" (MINISSL_NO_EXT=1) to run.
        repeats: interleaved repetitions of every configuration (one process each).

    Raises:
        ValueError: an unknown method or kernels entry, or a count below 1 (named).
    """
    from .methods import get_method

    for m in methods:
        get_method(m)
    bad = [k for k in kernels if k not in KERNELS]
    if bad or not kernels:
        raise ValueError(f"--kernels: expected some of {KERNELS}, got {list(kernels)}")
    for name, value in (("--iters", iters), ("--repeats", repeats), ("--threads", threads)):
        if value < 1:
            raise ValueError(f"{name}: expected at least 1, got {value}")
    if not 0 <= at < 1:
        raise ValueError(f"--at: expected a fraction of max_iters in [0, 1), got {at}")
    spec = dict(suite=suite, methods=list(methods), iters=iters, warmup=warmup, threads=threads, at=at,
                data_root=data_root, overrides=list(overrides), repeats=repeats)
    results = {k: {v: [] for v in VARIANTS} for k in kernels}
    for r in range(repeats):
        for k in kernels:
            for v in VARIANTS:
                print(f"[bench step] repetition {r + 1}/{repeats}: {v} step, {k}", file=sys.stderr, flush=True)
                got = run_configuration(v, k, spec)
                if k == "kernels" and not got["kernels_loaded"]:
                    raise RuntimeError("bench step: the compiled kernels did not load (see `minissl bench ops`); "
                                       "run with --kernels reference")
                results[k][v].append(got["methods"])
    return render(results, methods, kernels, spec)


def bench_memory(suite: str, methods: Sequence[str], shape: Sequence[int], steps: int = 2, threads: int = 1,
                 at: float = 0.5, limit_gib: float = 8.0, data_root: Optional[str] = None,
                 overrides: Sequence[str] = (), kernels: str = "kernels") -> str:
    """Peak memory of a few training steps of each method at patch ``shape``, one fresh process per method
    (the default step; ``kernels``: "kernels" or "reference"); a markdown table with the limit check.

    ``methods`` may hold "all": every registered method; those that do not apply to the suite are named
    below the table.

    Raises:
        ValueError: an unknown method, a count below 1 or a size below 1 (named).
    """
    from .data.sources import open_data
    from .methods import METHODS, get_method

    names = sorted(METHODS) if list(methods) == ["all"] else list(methods)
    for name, value in (("--steps", steps), ("--threads", threads)):
        if value < 1:
            raise ValueError(f"{name}: expected at least 1, got {value}")
    if not shape or min(shape) < 1:
        raise ValueError(f"--memory: expected positive patch sizes, got {list(shape)}")
    if kernels not in KERNELS:
        raise ValueError(f"--kernels: expected one of {KERNELS} with --memory, got {kernels!r}")
    spec = open_data(data_root or suite).spec
    if len(shape) != spec.spatial_dims:
        raise ValueError(f"--memory: expected {spec.spatial_dims} sizes for suite {spec.name!r}, got {list(shape)}")
    skipped = {m: get_method(m).applies_to(spec) for m in names}
    run = [m for m in names if skipped[m] is None]
    rows = []
    for m in run:
        print(f"[bench step] memory: {m}", file=sys.stderr, flush=True)
        job = dict(suite=suite, methods=[m], memory=list(shape), steps=steps, threads=threads, at=at,
                   data_root=data_root, overrides=list(overrides))
        done = run_configuration("default", kernels, job)
        if kernels == "kernels" and not done["kernels_loaded"]:
            raise RuntimeError("bench step: the compiled kernels did not load (see `minissl bench ops`); "
                               "run with --kernels reference")
        got = done["methods"][m]
        gib = got["peak_mb"] / 1024
        rows.append(f"| {m} | {gib:.2f} | {'yes' if gib <= limit_gib else 'NO'} |")
    size = "x".join(map(str, shape))
    lines = [f"**{spec.name}**: peak memory of {steps} training steps at {size}, {threads} thread(s), options "
             f"{' '.join(overrides) or '(suite defaults)'}", "",
             f"| method | peak GiB | <= {limit_gib:g} GiB |", "|---|---|---|"] + rows
    lines += ["", "Peak RSS of the steps minus the RSS once the method's models and optimisers are built, each "
                  "method in a fresh process."]
    off = sorted(m for m in names if skipped[m] is not None)
    if off:
        lines.append("Not applicable: " + "; ".join(f"{m} ({skipped[m]})" for m in off) + ".")
    return "\n".join(lines) + "\n"


def main(tokens: Sequence[str]) -> int:
    """``minissl bench step`` (see the module docstring)."""
    p = argparse.ArgumentParser(prog="minissl bench step", description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="cardiac")
    p.add_argument("--methods", default="supervised,mean_teacher,bcp", help="comma-separated registry names")
    p.add_argument("--iters", type=int, default=20, help="timed steps per repetition")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of each configuration")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--at", type=float, default=0.5, help="first step, as a fraction of max_iters")
    p.add_argument("--kernels", default="kernels,reference", help="kernels, reference, or both")
    p.add_argument("--data_root", default=None)
    p.add_argument("--memory", default=None, help="D,H,W (or H,W): measure peak memory at this patch size instead")
    p.add_argument("--steps", type=int, default=2, help="--memory: training steps measured")
    p.add_argument("--limit_gib", type=float, default=8.0, help="--memory: the limit each method is checked against")
    args, rest = p.parse_known_args(tokens)
    if args.memory:
        try:
            shape = [int(v) for v in args.memory.split(",")]
        except ValueError:
            raise ValueError(f"--memory: expected comma-separated integers such as 80,112,112, got {args.memory!r}")
        kernels = "kernels" if args.kernels == p.get_default("kernels") else args.kernels
        print(bench_memory(args.suite, args.methods.split(","), shape, args.steps, args.threads, args.at,
                           args.limit_gib, args.data_root, rest, kernels), end="")
        return 0
    print(bench_step(args.suite, args.methods.split(","), args.iters, args.warmup, args.repeats, args.threads,
                     args.at, args.kernels.split(","), args.data_root, rest), end="")
    return 0


if __name__ == "__main__":  # one configuration's process (run_configuration)
    print(json.dumps(_child(json.loads(sys.argv[1]))))
