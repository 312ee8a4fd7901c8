import math
import os
import signal

import pytest
import torch

from minissl import engine
from minissl.config import load_config
from minissl.data.sources import open_data
from minissl.methods import Method
from minissl.methods.base import ema_update, sigmoid_rampup
from minissl.run import Run, load_checkpoint


def tiny_cfg(root, tmp_path, **kw):
    base = dict(data_root=str(root), out_dir=str(tmp_path / "runs"), width=4, depth=2, batch_size=4,
                labeled_bs=2, max_iters=6, val_every=3, log_every=1, progress=False)
    return load_config(**(base | kw))


def test_sigmoid_rampup_and_ema():
    assert sigmoid_rampup(0.0, 0.4) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(0.2, 0.4) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(0.9, 0.4) == 1.0 and sigmoid_rampup(0.0, 0.0) == 1.0
    s, t = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ts, ss = t.weight.clone(), s.weight.clone()
    ema_update(t, s, decay=0.99, step=1)  # a = min(1 - 1/2, 0.99) = 0.5
    assert torch.allclose(t.weight, 0.5 * ts + 0.5 * ss)
    ema_update(t, s, decay=0.99, step=10 ** 6)
    assert torch.allclose(t.weight, 0.99 * (0.5 * ts + 0.5 * ss) + 0.01 * ss)
    # bit for bit the per-tensor update, and buffers copied (BatchNorm statistics)
    s, t = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    s(torch.randn(5, 3))
    with torch.no_grad():
        s.weight.add_(torch.randn(3))
    want = t.weight.detach().clone().mul_(0.9).add_(s.weight.detach(), alpha=0.1)
    ema_update(t, s, decay=0.9, step=10 ** 6)
    assert torch.equal(t.weight, want) and torch.equal(t.running_mean, s.running_mean)
    assert t.num_batches_tracked.item() == 1 and t.weight.grad_fn is None  # no graph recorded


def test_run_folder_and_protocol(tiny_stores, tmp_path, monkeypatch):
    calls = []
    real = engine.evaluation.evaluate

    def spy(model, cases, spec, device="cpu", **kw):
        calls.append([c.id for c in cases])
        return real(model, cases, spec, device=device, **kw)

    monkeypatch.setattr(engine.evaluation, "evaluate", spy)
    res = engine.train(tiny_cfg(tiny_stores["fetal_head"], tmp_path, method="mean_teacher"))
    for f in ("config.json", "log.csv", "best.pt", "last.pt", "metrics.json", "test_cases.csv", "test_cases.json"):
        assert (res.run_dir / f).is_file(), f
    store = open_data(res.config.data_source)
    assert calls == [store.split("test")]  # the test split is evaluated once, at the end
    run = Run(res.run_dir)
    vals = [(r["val_dice"], r["step"]) for r in run.log if r["val_dice"] is not None]
    assert [s for _, s in vals] == [3, 6] and all(isinstance(r["loss"], float) for r in run.log)
    best = max(vals, key=lambda v: (v[0], -v[1]))  # the first of equal bests is kept
    assert res.best_step == best[1] == load_checkpoint(res.run_dir / "best.pt")["step"]
    saved = run.saved
    assert saved["method"] == "mean_teacher" and saved["method_resolved"]["noise_std"] == 0.1
    assert run.config == res.config and run.method_name == "mean_teacher" and run.finished
    assert run.metrics["best_step"] == res.best_step and len(run.test_rows) == len(res.test_rows)
    assert 0.0 <= res.test["dice"]["mean"] <= 1.0


def test_resume_after_sigterm_matches_uninterrupted(tiny_stores, tmp_path, monkeypatch):
    root = tiny_stores["cardiac"]
    full = engine.train(tiny_cfg(root, tmp_path, method="mean_teacher", run_name="full"))

    real_update = Method.update

    def killing_update(self, batch, step, optimizers):
        out = real_update(self, batch, step, optimizers)
        if step == 3:  # a real SIGTERM in the middle of the run (not at a validation step)
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Method, "update", killing_update)
    with pytest.raises(KeyboardInterrupt, match="stopped at iteration 4; continue with --resume"):
        engine.train(tiny_cfg(root, tmp_path, method="mean_teacher", run_name="cut"))
    monkeypatch.setattr(Method, "update", real_update)
    assert load_checkpoint(tmp_path / "runs" / "cut" / "last.pt")["step"] == 4
    resumed = engine.train(tiny_cfg(root, tmp_path, method="mean_teacher", run_name="cut", resume=True))
    assert resumed.best_step == full.best_step
    a = load_checkpoint(full.run_dir / "last.pt")["method"]
    b = load_checkpoint(resumed.run_dir / "last.pt")["method"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.test == full.test


def test_bad_runs_are_explained(tiny_stores, tmp_path):
    root = tiny_stores["fetal_head"]
    engine.train(tiny_cfg(root, tmp_path, run_name="r", max_iters=2, val_every=1))
    with pytest.raises(ValueError, match="already holds a run: pass --resume"):
        engine.train(tiny_cfg(root, tmp_path, run_name="r", max_iters=2))
    with pytest.raises(ValueError, match="--resume: expected a checkpoint at"):
        engine.train(tiny_cfg(root, tmp_path, run_name="other", resume=True))
    with pytest.raises(ValueError, match="budget|patients"):
        engine.train(tiny_cfg(root, tmp_path, run_name="b", budget=99))
    with pytest.raises(ValueError, match=r"unknown method 'nope': expected one of \[.*'mean_teacher'"):
        engine.train(tiny_cfg(root, tmp_path, run_name="m", method="nope"))
    with pytest.raises(ValueError, match=r"unknown suite 'nope': expected one of"):
        engine.train(load_config(suite="nope", out_dir=str(tmp_path)))
