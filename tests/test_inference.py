"""predict_probs / predict_case: 2D slice-wise with resizing, 3D sliding window vs MONAI."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from minissl.inference import predict_case, predict_probs
from minissl.nets import UNet


def _net(spatial_dims, num_classes=3):
    torch.manual_seed(0)
    return UNet(1, num_classes, spatial_dims, width=4, depth=2)


def test_2d_slicewise_equals_batched_forward():
    net = _net(2)
    vol = np.random.default_rng(0).standard_normal((5, 16, 12)).astype(np.float32)
    probs = predict_probs(net, vol, 2, (16, 12), batch_size=2)
    with torch.no_grad():
        ref = torch.softmax(net.eval()(torch.from_numpy(vol)[:, None]), 1).movedim(1, 0).numpy()
    assert probs.shape == (3, 5, 16, 12)
    np.testing.assert_allclose(probs, ref, atol=1e-6)
    labels = predict_case(net, vol[2], 2, (16, 12))
    assert labels.dtype == np.int64 and np.array_equal(labels, ref[:, 2].argmax(0))


def test_2d_resizes_to_patch_and_back():
    net = _net(2)
    img = np.random.default_rng(1).standard_normal((20, 28)).astype(np.float32)
    probs = predict_probs(net, img, 2, (16, 16))
    with torch.no_grad():
        x = F.interpolate(torch.from_numpy(img)[None, None], size=(16, 16), mode="bilinear")
        logits = F.interpolate(net.eval()(x), size=(20, 28), mode="bilinear")
    np.testing.assert_allclose(probs, torch.softmax(logits, 1)[0].numpy(), atol=1e-6)
    assert predict_case(net, img, 2, (16, 16)).shape == (20, 28)


@pytest.mark.parametrize("shape,overlap", [((12, 20, 18), 0.5), ((6, 10, 30), 0.25), ((8, 8, 8), 0.0)])
def test_3d_sliding_window_matches_monai(shape, overlap):
    net = _net(3).eval()
    vol = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    patch = (8, 12, 16)
    probs = predict_probs(net, vol, 3, patch, batch_size=3, overlap=overlap)
    with torch.no_grad():
        ref = sliding_window_inference(torch.from_numpy(vol)[None, None], patch, 3,
                                       lambda x: torch.softmax(net(x), 1), overlap=overlap, mode="constant")
    assert probs.shape == (3, *shape)
    np.testing.assert_allclose(probs, ref[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def test_restores_train_mode_and_no_grad():
    net = _net(2, num_classes=1).train()
    probs = predict_probs(net.forward, np.zeros((16, 16)), 2, (16, 16))
    assert net.training and probs.shape == (2, 16, 16)        # sigmoid -> (1 - s, s)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-6)


def test_bad_input():
    net = _net(2)
    with pytest.raises(ValueError, match=r"\(Z, Y, X\) image for spatial_dims=3, got shape \(16, 16\)"):
        predict_case(net, np.zeros((16, 16)), 3, (8, 8, 8))
    with pytest.raises(ValueError, match="patch_size must have 2 entries"):
        predict_case(net, np.zeros((16, 16)), 2, (8, 8, 8))
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\)"):
        predict_case(net, np.zeros((8, 8, 8)), 3, (8, 8, 8), overlap=1.0)
