"""``minissl bench methods | render``: the leaderboard under one protocol, resumable, kept as data.

Every method runs on the same suite with the same labeled budget, iterations, augmentation, network
and seeds; only the method differs. A run trains in ``<out>/<suite>/<method>-b<budget>-i<iters>-<recipe>-s<seed>`` (an
interrupted one is resumed from its ``last.pt``); once finished, its small files are recorded under
``<results>/<suite>/b<budget>-i<iters>-<recipe>/<method>/seed<k>/`` (:mod:`minissl.results`). A run
whose result folder is complete is not trained again, so a long leaderboard continues where it
stopped, also on another machine or day: the committed ``results/`` is enough, the run folders are not needed.
The table (:func:`minissl.report.render_leaderboard`) gives per method mean ± std (ddof 1) over seeds
and the Dice difference to ``supervised`` paired by seed (same labeled cases, initial weights and
data order) with its Student-t 95 % interval and mark.

``minissl bench render`` writes every table of ``results/`` to ``docs/results/<suite>-<setting>.md``;
with ``--check`` it writes nothing and fails when a committed table differs from its rendering.

Example::

    minissl bench methods --suite cardiac --methods supervised,mean_teacher --seeds 0,1,2,3,4
    minissl bench methods --suite fetal_head --methods supervised --budget all   # the upper bound
    minissl bench methods --suite cardiac --methods supervised,bcp,m3hl --recipe official
    minissl bench methods --suite atrium --methods supervised,label_propagation --budget_kind slices:4
    minissl bench methods --suite nuclei --methods supervised,mean_teacher \
        --tag ema0.99 --tag_options="--ema_decay 0.99"
    minissl bench render --check
    minissl bench render --summary nuclei:b2-i300-shared,brain_tissue:b7-i300-shared   # the README's table

``--recipe official`` runs each method on its official recipe and pairs it with a supervised run on
that same recipe (``--recipe official:<method>``, results setting ``b<budget>-i<iters>-official:<method>``);
a method without an official recipe for the suite's dimension is named below the tables. Other options
go to every run's config; ``--budget_kind slices:<k>`` (every k-th slice of a labeled case annotated)
also names the setting, ``b<budget>s<k>-...``, so sparse and dense budgets never share a table.
``--tag T --tag_options="..."`` makes an ablation: those options go to every method except ``supervised``,
whose runs are recorded as ``<method>+T`` in the same setting and table, paired with the untouched baseline.
"""
from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from .config import load_config
from .data.sources import open_data
from .data.store import CaseStore
from .methods import get_method
from .report import render_all, render_leaderboard, render_summary
from .results import (DEFAULT_RECIPE, ResultRow, code_state, differences, is_complete, load, read_row, record,
                      result_dir)
from .run import LAST, Run

ABLATION = "+"  # an ablation's runs are recorded as <method>+<tag>


def run_one(suite: str, method: str, seed: int, budget: Optional[int], iters: Optional[int], out: Path,
            data_root: Optional[str] = None, overrides: Sequence[str] = (), progress: bool = False,
            store: Optional[CaseStore] = None, results: str | Path = "results",
            name: Optional[str] = None) -> ResultRow:
    """One run of the benchmark: read back from ``results`` when recorded, else trained (or resumed,
    or read back from its finished run folder) and recorded.

    Args:
        store: the suite's opened store, shared by every run of a benchmark (None: opened here).
        results: the results folder.
        name: the result's method label (None: ``method``); an ablation's runs keep their own folders.
    """
    from .engine import resolve, train

    code_state()  # the commit this process imported, before a long run lets HEAD move on
    kw = dict(method=method, suite=suite, seed=seed, out_dir=str(out / suite), progress=progress)
    if data_root:
        kw["data_root"] = data_root
    if iters:
        kw["max_iters"] = iters
    if budget:
        kw["budget"] = budget
    cfg = load_config(overrides=list(overrides), **kw)
    store = store if store is not None else open_data(cfg.data_source)
    cfg = resolve(cfg, store)
    name = name or method
    folder = result_dir(results, store.spec.name, cfg.budget, cfg.max_iters, name, seed,
                        getattr(cfg, "recipe", DEFAULT_RECIPE), cfg.budget_kind)
    if is_complete(folder):
        differ = differences(folder, asdict(cfg))
        if differ:
            raise ValueError(f"{folder} holds a result with another configuration (fields {differ} differ); "
                             f"expected the same options, or another --results folder")
    else:
        run_dir = Path(cfg.out_dir) / f"{name}-{folder.parent.parent.name}-s{seed}"  # one folder per setting
        cfg.run_name = run_dir.name
        if not ((run_dir / "config.json").is_file() and Run(run_dir).finished):
            cfg.resume = (run_dir / LAST).exists()
            train(cfg, store=store)
        record(Run(run_dir), results, name=None if name == method else name)
    return read_row(folder)


def with_official_recipe(methods: Sequence[str], spatial_dims: int) -> tuple[list[str], list[str]]:
    """Split ``methods`` into those with an official recipe for ``spatial_dims`` and those without.

    ``supervised`` is left out of both: under ``--recipe official`` it is the baseline of every pair.
    """
    names = [m for m in methods if m != "supervised"]
    return ([m for m in names if spatial_dims in get_method(m).official_recipes],
            [m for m in names if spatial_dims not in get_method(m).official_recipes])


def bench_official(suite: str, methods: Sequence[str], seeds: Sequence[int], budget: Optional[int] = None,
                   iters: Optional[int] = None, out: str = "runs/bench", data_root: Optional[str] = None,
                   overrides: Sequence[str] = (), results: str = "results",
                   store: Optional[CaseStore] = None) -> str:
    """``--recipe official``: every method on its official recipe, paired seed by seed with a supervised
    run on that same recipe (``--recipe official:<method>``, recorded under the setting of that name);
    one table per method, its rows shown under the setting ``official:<method>``.

    Raises:
        ValueError: no listed method besides ``supervised`` has an official recipe for the suite.
    """
    store = store if store is not None else open_data(data_root or suite)
    skipped = not_applicable(store.spec)
    paired, without = with_official_recipe([m for m in methods if m not in skipped], store.spec.spatial_dims)
    if not paired:
        raise ValueError(f"--recipe official: expected a method with an official {store.spec.spatial_dims}D recipe "
                         f"besides supervised, got {list(methods)}")
    tables = []
    for method in paired:
        rows = []
        for name, recipe in ((method, "official"), ("supervised", f"official:{method}")):
            for seed in seeds:
                print(f"[bench] {suite} {name} seed {seed} recipe {recipe}", flush=True)
                rows.append(run_one(suite, name, seed, budget, iters, Path(out), data_root,
                                    [*overrides, "--recipe", recipe], store=store, results=results))
        tables.append(render_leaderboard([replace(r, recipe=f"official:{method}") for r in rows]))
    if without:
        tables.append(f"No official {store.spec.spatial_dims}D recipe: {', '.join(sorted(without))}.\n")
    if set(methods) & set(skipped):
        tables.append(f"Not applicable to {suite}: {', '.join(sorted(set(methods) & set(skipped)))}.\n")
    text = "\n".join(tables)
    print(text)
    return text


def all_labels_budget(store: CaseStore) -> int:
    """The budget "all": every training patient with a label (unlabeled-only cases stay unlabeled)."""
    train = store.split("train")
    return len({p for p, has in zip(store.patients(train), store.has_label(train)) if has})


def not_applicable(spec: Any) -> dict[str, str]:
    """The registered methods that cannot train on a suite of ``spec``, with the reason."""
    from .methods import METHODS

    return {name: why for name, cls in sorted(METHODS.items()) if (why := cls.applies_to(spec)) is not None}


def bench_methods(suite: str, methods: Sequence[str], seeds: Sequence[int], budget: Optional[str] = None,
                  iters: Optional[int] = None, out: str = "runs/bench", data_root: Optional[str] = None,
                  overrides: Sequence[str] = (), results: str = "results", recipe: str = DEFAULT_RECIPE,
                  tag: Optional[str] = None, tagged: Sequence[str] = ()) -> str:
    """Run (or read back) every (method, seed), record it, and return and print the leaderboard.

    Args:
        budget: labeled cases, ``"all"`` for every training patient with a label, or None for the suite
            default.
        overrides: options of every run.
        results: the results folder.
        recipe: ``shared``, or ``official`` for :func:`bench_official`'s pairs.
        tag: an ablation: every method but ``supervised`` also gets the options ``tagged`` and is recorded
            as ``<method>+<tag>``; ``supervised`` runs without them, so it stays the baseline the
            untagged methods are paired with.

    Raises:
        ValueError: ``tag`` is not a plain label, or ``tagged`` options come without a ``tag``.
    """
    if tag is not None and not re.fullmatch(r"[A-Za-z0-9._=-]+", tag):
        raise ValueError(f"--tag: expected letters, digits and . _ = -, got {tag!r}")
    if tagged and tag is None:
        raise ValueError(f"bench_methods: options {list(tagged)} for tagged methods need a tag, got none")
    store = open_data(data_root or suite)
    if budget == "all":
        n_budget = all_labels_budget(store)
    else:
        n_budget = int(budget) if budget else None
    if recipe == "official":
        return bench_official(suite, methods, seeds, n_budget, iters, out, data_root, overrides, results, store)
    rows, skipped = [], not_applicable(store.spec)
    for method in methods:
        if method in skipped:
            print(f"[bench] {suite} {method}: not applicable ({skipped[method]})", flush=True)
            continue
        ablation = tag is not None and method != "supervised"
        name = f"{method}{ABLATION}{tag}" if ablation else method
        for seed in seeds:
            print(f"[bench] {suite} {name} seed {seed}", flush=True)
            rows.append(run_one(suite, method, seed, n_budget, iters, Path(out), data_root,
                                [*overrides, *(tagged if ablation else ())], store=store, results=results, name=name))
    text = render_leaderboard(rows, not_applicable=sorted(skipped))
    print(text)
    return text


def render(results: str = "results", docs: str = "docs/results", check: bool = False) -> list[Path]:
    """Write every table of ``results`` to ``docs`` (see :func:`minissl.report.render_all`).

    Args:
        check: write nothing; return the tables whose file is missing or differs from the rendering.

    Returns:
        The tables written, or with ``check`` the ones that differ.
    """
    from .data.phantoms import SUITES

    tables = render_all(results, docs, not_applicable={name: sorted(not_applicable(spec))
                                                       for name, spec in SUITES.items()})
    if check:
        return [p for p, text in tables.items() if not p.is_file() or p.read_text() != text]
    for path, text in tables.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(tables)


def summary(settings: Sequence[str], results: str | Path = "results") -> str:
    """The compact method x suite table (:func:`minissl.report.render_summary`) of the runs of the given
    settings, each ``<suite>:<setting>`` (e.g. ``nuclei:b2-i300-shared``). Methods only: ablations
    (``<method>+<tag>``) stay in the full tables.

    Raises:
        ValueError: an item is not ``<suite>:<setting>``, or ``results`` holds no run of it.
    """
    wanted = [tuple(item.split(":", 1)) for item in settings]
    bad = [item for item, pair in zip(settings, wanted) if len(pair) != 2 or not all(pair)]
    if bad:
        raise ValueError(f"--summary: expected items <suite>:<setting>, e.g. nuclei:b2-i300-shared, got {bad}")
    rows = [r for r in load(results) if (r.suite, r.setting) in wanted and ABLATION not in r.method]
    empty = [f"{s}:{t}" for s, t in wanted if not any((r.suite, r.setting) == (s, t) for r in rows)]
    if empty:
        raise ValueError(f"--summary: expected runs in {results} for every setting, found none for {empty}")
    return render_summary(rows)


def main(tokens: Sequence[str]) -> int:
    """``minissl bench methods`` (see the module docstring)."""
    p = argparse.ArgumentParser(prog="minissl bench methods", description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="cardiac")
    p.add_argument("--methods", default="supervised,mean_teacher", help="comma-separated registry names")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--budget", default=None, help="labeled cases, or 'all'")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--out", default="runs/bench", help="run folders (checkpoints, logs)")
    p.add_argument("--results", default="results", help="result folders (the committed small files)")
    p.add_argument("--data_root", default=None)
    p.add_argument("--recipe", default=DEFAULT_RECIPE, choices=(DEFAULT_RECIPE, "official"),
                   help="official: each method on its official recipe, paired with supervised on the same")
    p.add_argument("--budget_kind", default=None, help="cases (default) or slices:<k>; names the setting")
    p.add_argument("--tag", default=None, help="an ablation: every method but supervised also gets "
                   "--tag_options and is recorded as <method>+<tag>")
    p.add_argument("--tag_options", default="",
                   help='the ablation\'s options as one string, e.g. --tag_options="--ema_decay 0.99"')
    args, rest = p.parse_known_args(tokens)
    common = ["--budget_kind", args.budget_kind] if args.budget_kind else []
    bench_methods(args.suite, args.methods.split(","), [int(s) for s in args.seeds.split(",")], args.budget,
                  args.iters, args.out, args.data_root, common + rest, args.results, args.recipe, args.tag,
                  shlex.split(args.tag_options))
    return 0


def render_main(tokens: Sequence[str]) -> int:
    """``minissl bench render [--check]``: 1 when ``--check`` finds a table that differs."""
    p = argparse.ArgumentParser(prog="minissl bench render", description="Render every table of results/.")
    p.add_argument("--results", default="results")
    p.add_argument("--docs", default="docs/results")
    p.add_argument("--check", action="store_true", help="write nothing; fail when a committed table differs")
    p.add_argument("--summary", default=None, metavar="SUITE:SETTING,...",
                   help="print the compact method x suite table of these settings instead")
    args = p.parse_args(tokens)
    if args.summary:
        print(summary(args.summary.split(","), args.results), end="")
        return 0
    paths = render(args.results, args.docs, args.check)
    for path in paths:
        print(f"{'differs from its rendering' if args.check else 'wrote'}: {path}")
    return 1 if args.check and paths else 0
