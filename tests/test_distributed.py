"""Two CPU processes with gloo, as torchrun would start them: gradients are averaged over ranks, so
the ranks' weights stay identical while each rank trains on its own batches; rank 0 alone writes.

Parametrized over ``DDP_METHODS``: a method with an unusual update (several optimisers, inner passes)
belongs in the list; every optimiser step of every rank is recorded and compared."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from minissl import engine
from minissl.config import load_config

DDP_METHODS = ["mean_teacher", "c3s3", "medl", "mcnet_plus", "lefed", "transmedseg", "versemi", "spcl", "mn",
               "label_propagation"]  # c3s3, mn: two optimisers; lefed: 3 steps per iteration; label_propagation: stages
SUITE = {"mn": "atrium"}  # method -> suite of its run (default fetal_head)
ARGS = {"mn": {"pretext": "none"}}  # M&N's natural-image pretext has its own tests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, root, out, method):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    seen = {"weights": [], "grad": []}
    real_step = engine._GradAverage.step

    def recording_step(self):
        real_step(self)
        params = [p for g in self.opt.param_groups for p in g["params"]]
        seen["weights"].append(torch.cat([p.detach().reshape(-1) for p in params]).clone())
        seen["grad"].append(torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None]).clone())

    engine._GradAverage.step = recording_step
    cfg = load_config(method=method, data_root=root, out_dir=out, width=4, depth=2, batch_size=4,
                      labeled_bs=2, max_iters=4, val_every=2, progress=False, method_args=ARGS.get(method, {}))
    res = engine.train(cfg)
    # results go through files: a queue would deadlock (the child flushes while the parent joins)
    pad = torch.nn.utils.rnn.pad_sequence  # optimisers of different sizes: rows zero-padded to the longest
    np.savez(f"{out}/rank{rank}.npz", main=res is not None, weights=pad(seen["weights"], batch_first=True).numpy(),
             grad=pad(seen["grad"], batch_first=True).numpy())
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("method", DDP_METHODS)
def test_two_processes_gloo(method, tiny_stores, tmp_path):
    suite = SUITE.get(method, "fetal_head")
    mp.spawn(_worker, args=(2, _free_port(), str(tiny_stores[suite]), str(tmp_path), method), nprocs=2)
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in range(2))
    (main0, w0, g0), (main1, w1, g1) = ((r["main"], r["weights"], r["grad"]) for r in (r0, r1))
    assert (main0, main1) == (True, False)  # rank 0 validates, checkpoints and tests
    assert len(w0) == len(w1) >= 4  # one row per optimiser step (4 iterations, more with inner passes)
    assert (w0 == w1).all() and (g0 == g1).all()  # averaged gradients -> identical weights after every step
    assert abs(g0).sum() > 0 and not (w0[0] == w0[-1]).all()
    run = tmp_path / f"{suite}-{method}-b2-s0"
    assert (run / "metrics.json").is_file()
