"""UNet: shapes in 2D/3D, decoders, feature taps, perturbation, SSL4MIS size, errors."""
import pytest
import torch
from torch import nn

from minissl.nets import UNet
from minissl.nets.norm import BatchNorm2d
from minissl.nets.unet import Dropout


@pytest.mark.parametrize("spatial_dims,size", [(2, (32, 24)), (3, (8, 16, 8))])
def test_shapes_all_decoders(spatial_dims, size):
    net = UNet(2, 3, spatial_dims, width=4, depth=3, up_modes=("transpose", "linear", "nearest")).eval()
    x = torch.randn(2, 2, *size)
    feats = net.encode(x)
    assert [f.shape[1] for f in feats] == [4, 8, 16, 32]
    assert feats[-1].shape[2:] == tuple(s // 8 for s in size)
    outs = net.forward_all(x)
    assert len(outs) == 3 and all(o.shape == (2, 3, *size) for o in outs)
    logits, last = net.decode(feats, 1)
    assert torch.equal(logits, outs[1]) and last.shape == (2, 4, *size)
    assert torch.equal(net(x), outs[0])
    assert not torch.equal(outs[0], outs[1])                  # independent decoders


def test_layers_follow_ssl4mis():
    net = UNet(up_modes=("linear",))                          # SSL4MIS UNet: 16..256 channels, bilinear
    assert sum(p.numel() for p in net.parameters()) == 1_813_474
    block = net.encoder[0]
    assert [type(m) for m in block] == [nn.Conv2d, BatchNorm2d, nn.LeakyReLU, Dropout,  # an nn.Dropout
                                        nn.Conv2d, BatchNorm2d, nn.LeakyReLU]  # an nn.BatchNorm2d
    assert [b[3].p for b in net.encoder] == [0.05, 0.1, 0.2, 0.3, 0.5]
    assert [b[3].p for b in UNet(depth=2).encoder] == [0.2, 0.3, 0.5]
    net3 = UNet(spatial_dims=3, depth=2, width=4, dropout=0.1, up_modes="nearest")
    assert isinstance(net3.encoder[1][0], nn.Conv3d) and all(b[3].p == 0.1 for b in net3.encoder)
    assert isinstance(UNet(depth=2).decoders[0].ups[0], nn.ConvTranspose2d)


def test_feature_perturbation():
    net = UNet(1, 2, 2, width=4, depth=2, feature_dropout=0.5).eval()
    feats = net.encode(torch.randn(1, 1, 16, 16))
    torch.manual_seed(0)
    perturbed, _ = net.decode(feats, perturb=True)            # applied even in eval mode (UniMatch)
    assert not torch.equal(perturbed, net.decode(feats)[0])
    assert torch.equal(net.decode(feats)[0], net.decode(feats)[0])


def test_gradients_reach_encoder():
    net = UNet(1, 2, 2, width=4, depth=2, up_modes=("transpose", "linear"))
    sum(o.sum() for o in net.forward_all(torch.randn(2, 1, 8, 8))).backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("spatial_dims,size", [(2, (16, 8)), (3, (8, 8, 4))])
def test_stage_features_gates_and_feedback(spatial_dims, size):
    net = UNet(1, 2, spatial_dims, width=4, depth=2, up_modes=("transpose", "linear")).eval()
    x = torch.randn(2, 1, *size)
    feats = net.encode(x)
    logits, stages = net.decode_stages(feats, 1)
    assert torch.equal(logits, net.decode(feats, 1)[0])
    assert [s.shape for s in stages] == [f.shape for f in feats]  # stage k shaped like encoder level k
    assert torch.equal(stages[-1], feats[-1])                     # the decoder starts from the bottleneck
    ones = [torch.ones_like(f) for f in feats]
    gated, gated_stages = net.decode_stages(feats, 1, gates=ones)  # skips * 1, bottleneck f + f * 1
    doubled = net.decode_stages(feats[:-1] + [2 * feats[-1]], 1)
    assert torch.allclose(gated, doubled[0]) and torch.allclose(gated_stages[-1], 2 * feats[-1])
    zeros = [torch.zeros_like(f) for f in feats]
    assert not torch.allclose(net.decode_stages(feats, 1, gates=zeros)[0], logits)  # zero gates drop the skips
    assert all(torch.equal(a, b) for a, b in zip(net.encode(x, zeros), feats))
    fed = net.encode(x, [torch.zeros_like(feats[0]) + 1.0] + zeros[1:])
    assert torch.allclose(fed[0], feats[0] + 1.0) and not torch.allclose(fed[1], feats[1])  # deeper levels see it
    with pytest.raises(ValueError, match="encode expected feedback for 3 levels, got 2"):
        net.encode(x, zeros[:2])
    with pytest.raises(ValueError, match="decode_stages expected gates for 3 levels, got 1"):
        net.decode_stages(feats, 0, gates=ones[:1])


def test_in_place_activations_give_the_same_values_and_gradients():
    torch.manual_seed(0)
    net = UNet(1, 3, 2, width=4, depth=2, dropout=0.0, up_modes=("transpose", "linear"))
    x = torch.randn(2, 1, 8, 8)
    outs = {}
    for inplace in (True, False):
        for m in net.modules():
            if isinstance(m, nn.LeakyReLU):
                m.inplace = inplace
        net.zero_grad()
        y = sum(o.square().sum() for o in net.forward_all(x))
        y.backward()
        outs[inplace] = (y.detach(), [p.grad.clone() for p in net.parameters()])
    torch.testing.assert_close(outs[True][0], outs[False][0])
    for a, b in zip(outs[True][1], outs[False][1]):
        torch.testing.assert_close(a, b)


def test_bad_input():
    net = UNet(1, 2, 2, width=4, depth=3)
    with pytest.raises(ValueError, match=r"divisible by 2\*\*depth=8, got \(20, 16\)"):
        net(torch.zeros(1, 1, 20, 16))
    with pytest.raises(ValueError, match=r"C=1, got \(1, 3, 16, 16\)"):
        net(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="B, C, H, W"):
        net(torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match="up_modes must be 1 to 3"):
        UNet(up_modes=("transpose", "bicubic"))
    with pytest.raises(ValueError, match="dropout needs depth"):
        UNet(depth=5)
    with pytest.raises(ValueError, match=r"decoder index must be in \[0, 1\)"):
        net.decode(net.eval().encode(torch.zeros(1, 1, 8, 8)), 1)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        UNet(spatial_dims=1)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_on_channels_last_is_nn_batch_norm(dims, momentum):
    """minissl's BatchNorm on a channels-last CPU activation (float64 sums) gives nn.BatchNorm's output,
    gradients and running statistics; other inputs run nn.BatchNorm's own forward."""
    from minissl.nets.norm import BatchNorm3d
    torch.manual_seed(0)
    ours = (BatchNorm2d if dims == 2 else BatchNorm3d)(5, momentum=momentum).double()
    theirs = (torch.nn.BatchNorm2d if dims == 2 else torch.nn.BatchNorm3d)(5, momentum=momentum).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.uniform_(-1, 1)
    theirs.load_state_dict(ours.state_dict())
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    for step in range(2):
        x = (torch.randn(3, 5, *([4] * dims), dtype=torch.float64) * 2 + 1)
        xs = [x.contiguous(memory_format=fmt).requires_grad_(), x.clone().requires_grad_()]
        ys = [ours(xs[0]), theirs(xs[1])]
        assert ys[0].is_contiguous(memory_format=fmt)
        dy = torch.randn_like(x)
        for y in ys:
            y.backward(dy)
        torch.testing.assert_close(ys[0], ys[1])
        torch.testing.assert_close(xs[0].grad, xs[1].grad)
        for a, b in ((ours.weight.grad, theirs.weight.grad), (ours.bias.grad, theirs.bias.grad),
                     (ours.running_mean, theirs.running_mean), (ours.running_var, theirs.running_var)):
            torch.testing.assert_close(a, b)
        assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == step + 1
    assert isinstance(ours, torch.nn.BatchNorm2d if dims == 2 else torch.nn.BatchNorm3d)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.eval()  # eval: running statistics, nn.BatchNorm's forward
    x = torch.randn(2, 5, *([4] * dims), dtype=torch.float64)
    torch.testing.assert_close(ours(x.contiguous(memory_format=fmt)), theirs.eval()(x))
    with pytest.raises(ValueError, match="(?i)more than 1 value per channel"):
        ours.train()(torch.randn(1, 5, *([1] * dims), dtype=torch.float64).contiguous(memory_format=fmt))
