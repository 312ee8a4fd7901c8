"""minissl.run: the run folder read back (config, log, metrics, rows, method) and the RNG round trip."""
import random

import numpy as np
import pytest
import torch

from minissl import engine, evaluate
from minissl.config import load_config
from minissl.data.sources import open_data
from minissl.run import Run, rng_state, set_rng_state


def test_run_reads_back_what_train_wrote(tiny_stores, tmp_path):
    cfg = load_config(method="mean_teacher", data_root=str(tiny_stores["cardiac"]), out_dir=str(tmp_path), width=4,
                      depth=2, batch_size=4, labeled_bs=2, max_iters=4, val_every=2, log_every=1, progress=False)
    res = engine.train(cfg)
    run = Run(res.run_dir)
    assert run.finished and run.method_name == "mean_teacher" and run.config == res.config
    assert [r["step"] for r in run.log] == [1, 2, 3, 4]
    assert [r["val_dice"] is None for r in run.log] == [True, False, True, False]
    assert run.metrics["test"] == res.test and run.test_rows == res.test_rows
    method = run.load_method()
    assert not method.training
    store = open_data(tiny_stores["cardiac"])
    rows = evaluate.evaluate(method.predict, [store.read(i) for i in store.split("test")], store.spec)
    assert rows == res.test_rows  # the best checkpoint, restored, scores what the run reported


def test_rng_state_round_trip():
    gen = torch.Generator().manual_seed(3)
    state = rng_state(gen)
    first = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    set_rng_state(gen, state)
    again = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])


def test_unfinished_run_says_so(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / ".last.pt.tmp4242").write_bytes(b"half a checkpoint")  # a write killed by kill -9
    Run.create(tmp_path / "r", load_config())
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["config.json"]
    run = Run(tmp_path / "r")
    assert not run.finished and run.log == []
    with pytest.raises(ValueError, match="metrics.json not found: the run has not finished"):
        run.metrics
