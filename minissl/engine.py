"""The one training loop: every method, every suite, CPU or GPU.

What it guarantees (the protocol):

* **iterations, not epochs**; the learning rate follows the run's recipe over ``max_iters``
  (:mod:`minissl.recipes`: the shared poly ``lr (1 - t)^0.9`` of SSL4MIS, or the method's official one);
* **checkpoints are chosen on the validation split only**: every ``val_every`` iterations the
  model is evaluated on the validation cases (mean foreground Dice); the best is kept as
  ``best.pt``. The test split is evaluated **once**, at the end, with the best checkpoint. A
  method with stages is also validated at each stage end and starts the next stage from the
  stage's best-on-validation weights (``stage_best.pt``);
* **every input checked before anything is written**: config ranges, the device, the network depth
  against the patch size, the method's options; an error leaves no run folder behind;
* **atomic checkpoints of plain data** (:mod:`minissl.run`: loaded with ``weights_only=True``) and
  an exact ``--resume``: the model, optimisers, every random generator (torch, numpy, python, the
  method's own, the batch stream position) and the log are restored, so an interrupted run ends
  where an uninterrupted one would. A resume whose configuration differs in anything that changes
  training is refused, naming the fields. SIGTERM and Ctrl-C save ``last.pt`` before leaving;
* **many processes** with ``torchrun`` (one per GPU, NCCL; or CPU processes, gloo) and no other
  change: each rank draws its own batches, gradients are averaged over ranks before every
  optimiser step (so every method, whatever its networks, is data-parallel), and rank 0 validates,
  writes checkpoints and tests. Exact resume is guaranteed for one process;
* a run folder ``<out_dir>/<run_name>/`` with ``config.json``, ``log.csv`` (TensorBoard events too
  when ``tensorboard`` is installed), ``best.pt``, ``last.pt``, ``test_cases.csv/json`` and
  ``metrics.json``.
"""
from __future__ import annotations

import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from . import evaluate as evaluation
from . import metrics, runtime
from .atomic import write_text_atomic
from .config import SAFE_OVERRIDES, Config, resolve_args
from .data import datasets, sources
from .data.store import Budget, CaseStore
from .inference import predict_case
from .methods import METHODS, Method, get_method
from .ops import _build
from .run import BEST, LAST, STAGE_BEST, Run, load_checkpoint, load_state, rng_state, save_checkpoint, set_rng_state


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (the one seeding function of the library)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve(cfg: Config, store: CaseStore) -> Config:
    """Fill the suite-dependent defaults (iterations, budget, run name, validation period)."""
    spec = store.spec
    max_iters = cfg.max_iters or int(spec.default_iters)
    budget = cfg.budget or int(spec.default_budget)
    kind = "" if cfg.budget_kind == "cases" else cfg.budget_kind.replace(":", "")
    name = cfg.run_name or f"{spec.name}-{cfg.method}-b{budget}{kind}-s{cfg.seed}"
    val_every = cfg.val_every or max(max_iters // 10, 1)
    return replace(cfg, max_iters=max_iters, budget=budget, run_name=name, val_every=val_every)


NOT_COMPARED = ("resume", "resume_override", "progress", "out_dir", "run_name", "method_args")


def check_device(name: str) -> torch.device:
    """``name`` as a torch device that this torch build can use (ValueError naming ``--device`` otherwise)."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"--device {name}: {why}; expected --device cpu (or a machine with a GPU)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: expected a GPU index below {torch.cuda.device_count()}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available; expected --device cpu")
    return device


def check_depth(cfg: Config, spec: Any) -> None:
    """The UNet halves the patch ``depth`` times: every patch side must be divisible by ``2**depth``."""
    if any(s % 2 ** cfg.depth for s in spec.patch_size):
        deepest = min((s & -s).bit_length() - 1 for s in spec.patch_size)
        raise ValueError(f"--depth: expected at most {deepest} down-samplings for the patch size "
                         f"{tuple(spec.patch_size)} of suite {spec.name!r} (each side divisible by 2**depth), "
                         f"got {cfg.depth}")


def config_changes(saved: dict, cfg: Config, resolved_args: dict) -> list[str]:
    """``"field: old -> new"`` for every training field in which ``cfg`` differs from a saved config."""
    new = asdict(cfg) | {"method_resolved": resolved_args}
    keys = [f.name for f in fields(Config) if f.name not in NOT_COMPARED] + ["method_resolved"]
    return [f"{k}: {saved.get(k)!r} -> {new[k]!r}" for k in keys if saved.get(k) != new[k]]


def _check_resume(saved: dict, cfg: Config, resolved_args: dict, run_dir: Path) -> None:
    allowed = {n.strip() for n in cfg.resume_override.split(",") if n.strip()}
    changes = [c for c in config_changes(saved, cfg, resolved_args) if c.split(":")[0] not in allowed]
    if changes:
        safe = [c.split(":")[0] for c in changes if c.split(":")[0] in SAFE_OVERRIDES]
        hint = f"; to allow {', '.join(safe)} pass --resume_override {','.join(safe)}" if safe else ""
        raise ValueError(f"--resume: the run in {run_dir} was trained with another configuration "
                         f"({'; '.join(changes)}); resume with the same values{hint}")


class _Log:
    """Rows of ``log.csv`` (kept in memory and in checkpoints; TensorBoard when installed)."""

    def __init__(self, run: Optional[Run], rows: Optional[list[dict]] = None):
        self.run, self.rows, self.tb = run, rows or [], None
        if run is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run.path / "tb"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and v is not None and v == v:
                    self.tb.add_scalar(k, v, row["step"])

    def flush(self) -> None:
        self.run.write_log(self.rows)


@torch.no_grad()
def validate(method: Method, cases: list, spec: Any, device: torch.device, task: Optional[int] = None) -> float:
    """Mean foreground Dice over the validation cases (what checkpoints are chosen on); ``task``: of one suite."""
    was_training = method.training
    method.eval()
    scores = []
    for case in cases:
        pred = predict_case(evaluation.predictor(method, task, spec.num_classes), case.image, spec.spatial_dims,
                            spec.patch_size, device=device, zoom=spec.zoom)
        for c in range(1, spec.num_classes):
            scores.append(metrics.dice(pred == c, case.label == c))
    method.train(was_training)
    return float(np.mean(scores))


@dataclass
class RunResult:
    """What ``train`` returns: the run folder, the resolved config and the test summary."""

    run_dir: Path
    config: Config
    best_step: int
    best_val_dice: float
    test: dict  # summarise(rows): metric -> {'mean', 'std'}
    test_rows: list
    seconds_per_iter: float


class _Dist:
    """``torchrun`` support: rank and world size from the environment, process group set up once."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device(device)
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.main = self.rank == 0

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (a stop request reaches everyone)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


class _GradAverage:
    """An optimiser whose ``step`` first averages the gradients over all ranks (data parallelism
    that works for any method, whatever networks it trains)."""

    def __init__(self, opt: torch.optim.Optimizer, world: int):
        self.opt, self.world = opt, world

    def step(self) -> None:
        grads = [p.grad for g in self.opt.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])  # one collective per step
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for g in grads:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()
        self.opt.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.opt, name)


class _Stop:
    """SIGTERM / SIGINT flag: the loop saves ``last.pt`` and leaves at the end of the step."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C leaves at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(cfg: Config, overwrite: bool = False, store: Optional[CaseStore] = None) -> Optional[RunResult]:
    """Train ``cfg.method`` on ``cfg``'s data, choose the checkpoint on validation, test once.

    Args:
        cfg: the run configuration (suite defaults are filled in here).
        overwrite: start afresh even if the run folder already holds a run.
        store: the run's data when the caller has opened it (default: ``cfg.data_source``).

    Returns:
        A RunResult (None on ranks > 0 under torchrun); the run folder holds everything needed to
        inspect or resume it.
    """
    cfg = replace(cfg).validate()
    check_device(cfg.device)
    method_cls = get_method(cfg.method)
    if cfg.suites and not getattr(method_cls, "multi_task", False):
        raise ValueError(f"--suites: method {cfg.method!r} trains one task; several suites need a task-prompted "
                         f"method ({', '.join(n for n, m in METHODS.items() if getattr(m, 'multi_task', False))})")
    resolve_args(method_cls.Args, cfg.method_args, cfg.method)  # a misspelled option fails before any data work
    store = store if store is not None else sources.open_data(cfg.data_source)
    cfg = resolve(cfg, store)
    if cfg.budget_kind != "cases" and store.spec.spatial_dims == 3 and not method_cls.uses_label_mask:
        able = sorted(n for n, m in METHODS.items() if m.uses_label_mask)
        raise ValueError(f"--budget_kind {cfg.budget_kind}: method {cfg.method!r} does not mask unannotated slices "
                         f"in its losses (3D suite {store.spec.name!r}); expected --budget_kind cases or one of {able}")
    labeled = store.labeled(cfg.budget, cfg.seed)  # resolved once, passed down
    sources.check_store(store, labeled)  # every split and case, before anything is created
    spec = store.spec
    check_depth(cfg, spec)
    run_dir = Path(cfg.out_dir) / cfg.run_name
    last_path, best_path = run_dir / LAST, run_dir / BEST
    if last_path.exists() and not (cfg.resume or overwrite):
        raise ValueError(f"run folder {run_dir} already holds a run: pass --resume to continue it, "
                         f"or choose another --run_name")
    if cfg.resume and not last_path.exists():
        raise ValueError(f"--resume: expected a checkpoint at {last_path}, found none")
    ckpt = load_checkpoint(last_path) if cfg.resume else None

    ddp = _Dist(cfg.device)
    device = ddp.device
    seed_everything(cfg.seed)  # the same seed on every rank: identical initial weights
    method = method_cls(cfg, spec).to(device)
    runtime.speed_up(method, spec.spatial_dims, device)  # same results, faster (MINISSL_PLAIN_STEP=1: off)
    if ckpt is not None:
        _check_resume(ckpt.get("config", {}), cfg, method.resolved_args(), run_dir)
    optimizers = method.optimizers()
    for opt in optimizers:  # the schedule scales each group's initial rate
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
    if ddp.world > 1:
        optimizers = [_GradAverage(o, ddp.world) for o in optimizers]
    rss_built = runtime.reset_peak_rss()  # peak memory counts from here (metrics: peak_rss_mb, runtime.PEAK_FROM)
    extra = {"method_resolved": method.resolved_args(), "suite_spec": _spec_dict(spec)}
    run = Run.create(run_dir, cfg, extra) if ddp.main else None
    if run is not None:  # the labeled cases of this run (any budget), kept beside it, never in the data
        write_text_atomic(run_dir / "labeled.txt", "".join(c + "\n" for c in labeled))
    val_sets = [(t if cfg.suites else None, sub.spec, [sub.read(i) for i in sub.split("val")])
                for t, sub in datasets.tasks(store)]  # per suite: each with its prompt (Config.suites)

    start, best_val, best_step, rows, stage_best = 0, -1.0, -1, [], -1.0
    stage_ends, stage_path = set(method.stage_ends()), run_dir / STAGE_BEST
    if ckpt is not None:
        load_state(method, ckpt, last_path)
        for opt, st in zip(optimizers, ckpt["optimizers"]):
            opt.load_state_dict(st)
        start, best_val, best_step, rows = ckpt["step"], ckpt["best_val"], ckpt["best_step"], ckpt["log"]
        stage_best = ckpt.get("stage_best", -1.0)
    log = _Log(run, rows)
    if ckpt is not None:
        set_rng_state(method.rng, ckpt["rng"])
    # supervised methods draw only the labeled stream: the same labeled images per step as the others
    # rank r > 0 draws its own batches (seed + 7919 r); rank 0 draws those of a single-process run
    batches = datasets.make_train_loader(store, labeled, seed=cfg.seed + 7919 * ddp.rank, batch_size=cfg.batch_size,
                                         labeled_bs=cfg.labeled_bs, unlabeled=method.semi_supervised, start=start,
                                         budget=Budget(cfg.budget, cfg.seed, cfg.budget_kind), fill=method.fill_labels)

    def checkpoint(step: int) -> dict:
        return {"step": step, "method": method.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
                "best_val": best_val, "best_step": best_step, "stage_best": stage_best, "log": log.rows,
                "rng": rng_state(method.rng),
                "config": extra | asdict(cfg)}

    _build.get_kernel("dice_ce_entropy")  # the one-time kernel build is not training time
    train_time, cpu_time, done = 0.0, 0.0, 0  # wall / process-CPU seconds in update() only (no validation)
    method.train()
    bar = _progress(cfg, start) if ddp.main else None
    with _Stop() as stop:
        for step in range(start, cfg.max_iters):
            factor = method.lr_factor(step)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * factor
            lr = optimizers[0].param_groups[0]["lr"]
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            t0, c0 = time.perf_counter(), time.process_time()
            parts = method.update(batch, step, optimizers)
            train_time += time.perf_counter() - t0
            cpu_time += time.process_time() - c0
            if not math.isfinite(parts["loss"]):
                raise FloatingPointError(f"loss became {parts['loss']} at iteration {step} ({parts}); "
                                         f"lower --lr or check the data")
            done += 1
            it = step + 1
            row = None
            if it % cfg.log_every == 0 or it == cfg.max_iters:
                row = {"step": it, "lr": lr, **parts}
            stopping = ddp.any(stop.requested)
            ends_stage = it in stage_ends
            if (it % cfg.val_every == 0 or it == cfg.max_iters or ends_stage) and ddp.main:
                val = float(np.mean([validate(method, cases, sp, device, t) for t, sp, cases in val_sets]))
                row = (row or {"step": it}) | {"val_dice": val}
                if val > best_val:
                    best_val, best_step = val, it
                    save_checkpoint({"step": it, "method": method.state_dict(), "val_dice": val}, best_path)
                if stage_ends and val > stage_best:
                    stage_best = val
                    save_checkpoint({"step": it, "method": method.state_dict(), "val_dice": val,
                                     "optimizers": [o.state_dict() for o in optimizers]}, stage_path)
            if ends_stage:  # the next stage starts from this stage's best-on-validation weights and optimiser state
                if ddp.world > 1:
                    dist.barrier()
                stage = load_checkpoint(stage_path, map_location=device)
                for opt, st in zip(optimizers, stage["optimizers"]):  # the optimisers of that same step
                    opt.load_state_dict(st)
                method.end_stage(it, stage["method"], optimizers)
                stage_best = -1.0
            if row is not None:
                log.add(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{parts['loss']:.3f}", best=f"{best_val:.3f}")
            if (it % cfg.val_every == 0 or it == cfg.max_iters or stopping or ends_stage) and ddp.main:
                log.flush()
                save_checkpoint(checkpoint(it), last_path)
            if stopping and it < cfg.max_iters:
                if bar is not None:
                    bar.close()
                raise KeyboardInterrupt(f"stopped at iteration {it}; continue with --resume "
                                        f"(run folder {run_dir})")
    if bar is not None:
        bar.close()
    sec_per_iter, cpu_per_iter = train_time / max(done, 1), cpu_time / max(done, 1)
    if ddp.world > 1:
        dist.barrier()
        if not ddp.main:
            return None

    # test once, with the checkpoint chosen on validation
    load_state(method, load_checkpoint(best_path, map_location=device), best_path)
    method.eval()
    test_rows = evaluation.evaluate_split(method, store, "test", device=device)
    evaluation.write_rows(test_rows, run_dir / "test_cases.csv", run_dir / "test_cases.json")
    summary = evaluation.summarise(test_rows)
    run.write_metrics({"best_step": best_step, "best_val_dice": best_val, "seconds_per_iter": sec_per_iter,
                       "cpu_seconds_per_iter": cpu_per_iter, "test": summary,
                       "test_per_class": evaluation.summarise(test_rows, by_class=True),
                       "peak_rss_mb": runtime.peak_rss_mb() - rss_built, "rss_built_mb": rss_built,
                       "peak_rss_from": runtime.PEAK_FROM})
    return RunResult(run_dir, cfg, best_step, best_val, summary, test_rows, sec_per_iter)


def _spec_dict(spec: Any) -> dict:
    from dataclasses import asdict, is_dataclass

    return asdict(spec) if is_dataclass(spec) else dict(vars(spec))


def _progress(cfg: Config, start: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_iters, initial=start, desc=f"{cfg.method}", leave=False, dynamic_ncols=True, disable=None)  # no bar when not a terminal
