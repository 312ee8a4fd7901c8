"""TransMedSeg's parts: the TSA bound against a Monte-Carlo estimate of the expected cross-entropy, its value
worked out by hand, and the EMA memory of class statistics."""
import math

import pytest
import torch
import torch.nn.functional as F

from minissl.config import load_config
from minissl.data.sources import open_data
from minissl.methods.transmedseg import FeatureMemory, TransMedSeg, class_moments, tsa_loss, tsa_shift


def test_tsa_bound_by_hand_one_pixel():
    # D = 1, C = 2, w = (0, 1), b = 0, f = 0, y = 0, dmu_0 = 1, Sigma_0 = 1, alpha = 1:
    # class 1: dw = 1 -> 1 * 1 + 0.5 * 1 * 1 * 1 = 1.5; class 0: 0  =>  log(1 + e^1.5)
    weight = torch.tensor([[[[0.0]]], [[[1.0]]]])  # (C=2, D=1, 1, 1)
    logits, labels = torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, dtype=torch.int64)
    delta_mu, cov = torch.tensor([[1.0], [5.0]]), torch.tensor([[[1.0]], [[7.0]]])
    loss = tsa_loss(logits, labels, weight, delta_mu, cov, alpha=1.0, padding=0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(1.5)), rel=1e-6)


def _sampled_ce(feats, labels, head, delta_mu, cov, alpha, samples, gen):
    """Monte-Carlo mean over augmentations delta_j ~ N(alpha dmu_{y_j}, alpha Sigma_{y_j}) of the per-pixel CE."""
    chol = torch.linalg.cholesky(alpha * cov)  # (C, D, D)
    f = feats.movedim(1, -1)  # (B, *S, D)
    total = torch.zeros(labels.shape, dtype=torch.float64)
    for _ in range(samples):
        eps = torch.randn(f.shape, generator=gen, dtype=torch.float64)  # (B, *S, D)
        delta = alpha * delta_mu[labels] + (chol[labels] @ eps[..., None])[..., 0]  # (B, *S, D)
        total += F.cross_entropy(head((f + delta).movedim(-1, 1)), labels, reduction="none")
    return total / samples


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_tsa_bound_is_above_the_sampled_expectation_and_tight_without_spread(spatial_dims):
    gen = torch.Generator().manual_seed(0)
    c, d, spatial = 3, 4, (5, 6) if spatial_dims == 2 else (3, 4, 4)
    conv = torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d
    torch.manual_seed(0)
    head = conv(d, c, 3, padding=1).double()
    with torch.no_grad():
        head.weight.mul_(2.0)  # logits that spread enough for the Jensen gap to stand out of the sampling noise
    feats = torch.randn(2, d, *spatial, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, c, (2, *spatial), generator=gen)
    delta_mu = torch.randn(c, d, generator=gen, dtype=torch.float64)
    a = torch.randn(c, d, d, generator=gen, dtype=torch.float64)
    cov = a @ a.transpose(1, 2) / d + 0.1 * torch.eye(d, dtype=torch.float64)  # (C, D, D) positive definite
    alpha = 0.7
    with torch.no_grad():
        logits = head(feats)
        bound = F.cross_entropy(logits + tsa_shift(head.weight, labels, delta_mu, cov, alpha, head.padding), labels,
                                reduction="none")  # (B, *S)
        sampled = _sampled_ce(feats, labels, head, delta_mu, cov, alpha, 4000, gen)
        assert (bound >= sampled - 0.02).all()  # per pixel, up to Monte-Carlo noise
        assert bound.mean() > sampled.mean() + 0.05  # strictly above with spread
        # Sigma -> 0: the augmentation is the fixed shift alpha dmu, and the bound is the exact loss
        tiny = cov * 1e-10
        bound0 = F.cross_entropy(logits + tsa_shift(head.weight, labels, delta_mu, tiny, alpha, head.padding),
                                 labels, reduction="none")
        sampled0 = _sampled_ce(feats, labels, head, delta_mu, tiny, alpha, 2, gen)
        assert torch.allclose(bound0, sampled0, atol=1e-4)
        assert not torch.allclose(bound0, F.cross_entropy(logits, labels, reduction="none"), atol=1e-2)


def test_tsa_shift_is_zero_at_the_target_class_and_checks_shapes():
    weight = torch.randn(3, 4, 3, 3)
    labels = torch.randint(0, 3, (2, 6, 6))
    shift = tsa_shift(weight, labels, torch.randn(3, 4), torch.eye(4).expand(3, 4, 4), 0.5, 1)
    assert shift.shape == (2, 3, 6, 6)
    assert torch.equal(shift.gather(1, labels[:, None]), torch.zeros(2, 1, 6, 6))
    with pytest.raises(ValueError, match=r"tsa_shift: expected delta_mu \(3, 4\) and cov \(3, 4, 4\) .* got "
                                         r"\(3, 5\) and \(3, 4, 4\)"):
        tsa_shift(weight, labels, torch.randn(3, 5), torch.eye(4).expand(3, 4, 4), 0.5, 1)


def test_class_moments_and_memory_ema_by_hand():
    feats = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])  # (N=3, D=2)
    labels = torch.tensor([0, 0, 2])
    count, sums, outer = class_moments(feats, labels, 3)
    assert count.tolist() == [2.0, 0.0, 1.0] and sums[0].tolist() == [4.0, 2.0]
    assert outer[0].tolist() == [[10.0, 6.0], [6.0, 4.0]]
    mem = FeatureMemory(3, 2)
    mem.update(feats, labels, momentum=0.9)  # first update of class 0 is copied; classes 1, 2 (< 2 pixels) keep 0
    assert mem.mean[0].tolist() == [2.0, 1.0] and mem.cov[0].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert mem.updates.tolist() == [1, 0, 0] and mem.mean[1:].abs().sum() == 0
    mem.update(torch.tensor([[0.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]), momentum=0.9)
    # second update: a = min(1 - 1/2, 0.9) = 0.5; batch mean (0, 2), batch covariance [[0, 0], [0, 1]]
    assert mem.mean[0].tolist() == [1.0, 1.5] and mem.cov[0].tolist() == [[0.5, 0.5], [0.5, 1.0]]
    mem.update(torch.tensor([[2.0, 1.5], [0.0, 1.5]]), torch.tensor([0, 0]), momentum=0.6)
    # third: a = min(1 - 1/3, 0.6) = 0.6; batch mean (1, 1.5) -> unchanged mean, covariance 0.6 C + 0.4 [[1, 0], [0, 0]]
    assert torch.allclose(mem.mean[0], torch.tensor([1.0, 1.5]))
    assert torch.allclose(mem.cov[0], torch.tensor([[0.7, 0.3], [0.3, 0.6]]))


def test_training_step_fills_the_memories_from_subsampled_pixels(tiny_stores):
    store = open_data(tiny_stores["cardiac"])
    cfg = load_config(method="transmedseg", data_root=str(tiny_stores["cardiac"]), width=4, depth=2,
                      max_iters=10, progress=False, method_args={"stat_pixels": 50})
    method = TransMedSeg(cfg, store.spec)
    size = tuple(store.spec.patch_size)
    batch = {"x_l": torch.rand(2, 1, *size), "y_l": torch.randint(0, 4, (2, *size)), "x_u": torch.rand(2, 1, *size)}
    out = method.training_step(batch, step=5)
    assert out["tsa"] > 0 and out["mse"] > 0
    assert method.student_memory.updates.sum() > 0 and method.teacher_memory.updates.sum() > 0
    assert not torch.equal(method.student_memory.mean, method.teacher_memory.mean)
    assert method.alpha(5) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="transmedseg: expected stat_pixels >= 2"):
        TransMedSeg(load_config(method="transmedseg", data_root=str(tiny_stores["cardiac"]), width=4, depth=2,
                                max_iters=10, progress=False, method_args={"stat_pixels": 1}), store.spec)


def _memory_worker(rank, world, port, out):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(rank)
    mem = FeatureMemory(3, 2)
    mem.update(torch.randn(40, 2, generator=gen), torch.randint(0, 3, (40,), generator=gen), momentum=0.9)
    torch.save(mem.state_dict(), f"{out}/memory{rank}.pt")
    torch.distributed.destroy_process_group()


def test_memory_under_ddp_is_the_memory_of_all_ranks_pixels(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_memory_worker, args=(2, port, str(tmp_path)), nprocs=2)
    m0, m1 = (torch.load(tmp_path / f"memory{r}.pt") for r in range(2))
    gens = [torch.Generator().manual_seed(r) for r in range(2)]
    data = [(torch.randn(40, 2, generator=g), torch.randint(0, 3, (40,), generator=g)) for g in gens]
    alone = FeatureMemory(3, 2)
    alone.update(torch.cat([f for f, _ in data]), torch.cat([y for _, y in data]), momentum=0.9)
    for key, value in alone.state_dict().items():
        assert torch.equal(m0[key], m1[key]) and torch.allclose(m0[key], value, atol=1e-6), key
