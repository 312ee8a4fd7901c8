"""ResUNet (shapes in 2D/3D, ResNet34 stages, additive skips, zero-init residuals, errors) and
``checkpointed`` (same values, same gradients, BatchNorm statistics counted once)."""
import pytest
import torch
from torch import nn

from minissl.nets import ResUNet, UNet, checkpointed
from minissl.nets.resunet import BasicBlock, StridedPointwise2d, StridedPointwise3d


@pytest.mark.parametrize("spatial_dims,size", [(2, (32, 24)), (3, (8, 16, 8))])
def test_shapes_and_levels(spatial_dims, size):
    net = ResUNet(2, 3, spatial_dims, width=4, depth=3).eval()
    x = torch.randn(2, 2, *size)
    feats = net.encode(x)
    assert [f.shape[1] for f in feats] == [4, 8, 16, 32]
    assert [f.shape[2:] for f in feats] == [torch.Size(s // 2 ** k for s in size) for k in range(4)]
    logits, last = net.decode(feats)
    assert logits.shape == (2, 3, *size) and last.shape == (2, 4, *size)
    assert torch.equal(net(x), logits)


def test_resnet34_stages_and_vnet_decoder():
    net = ResUNet(1, 2, 3, width=16, depth=4)
    assert [len(s) for s in net.stages] == [3, 4, 6, 3]  # ResNet34 basic blocks per stage
    assert all(isinstance(b, BasicBlock) for s in net.stages for b in s)
    first = net.stages[0][0]
    assert first.body[0].stride == (2, 2, 2) and isinstance(first.shortcut, nn.Sequential)
    assert isinstance(net.stages[0][1].shortcut, nn.Identity)
    assert isinstance(net.stem[0], nn.Conv3d) and net.stem[0].kernel_size == (7, 7, 7)
    n_convs = [sum(isinstance(m, nn.Conv3d) for m in b) for b in net.blocks]  # levels 3, 2, 1, 0
    assert n_convs == [3, 3, 2, 1]
    assert isinstance(net.dropout, nn.Dropout3d) and net.dropout.p == 0.5
    assert [len(s) for s in ResUNet(depth=5, width=2).stages] == [3, 4, 6, 3, 3]  # the last count repeats


@pytest.mark.parametrize("cls,conv,size", [(StridedPointwise2d, nn.Conv2d, (9, 8)), (StridedPointwise3d, nn.Conv3d, (5, 6, 7))])
def test_strided_pointwise_is_the_strided_1x1_convolution(cls, conv, size):
    torch.manual_seed(0)
    ours, plain = cls(8, 16, 2), conv(8, 16, 1, stride=2, bias=False)
    plain.load_state_dict(ours.state_dict())  # the same parameter names and shapes
    x = torch.randn(2, 8, *size)
    torch.testing.assert_close(ours(x), plain(x))
    fmt = torch.channels_last if len(size) == 2 else torch.channels_last_3d
    ours = ours.to(memory_format=fmt)  # the layout whose strided 1x1 weight gradient crashed in oneDNN
    xs = torch.randn(8, 8, *((64, 64) if len(size) == 2 else (16, 16, 8))).contiguous(memory_format=fmt)
    ours(xs).sum().backward()
    plain.weight.grad = None
    plain(xs.contiguous()).sum().backward()
    torch.testing.assert_close(ours.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-4)


def test_zero_init_residual_makes_each_block_its_shortcut():
    block = BasicBlock(4, 4, spatial_dims=2).eval()
    x = torch.randn(2, 4, 8, 8)
    assert float(block.body[-1].weight.detach().abs().sum()) == 0
    assert torch.allclose(block(x), torch.relu(x))
    down = BasicBlock(4, 8, spatial_dims=2, stride=2).eval()
    assert torch.allclose(down(x), torch.relu(down.shortcut(x)))


def test_skips_are_added():
    net = ResUNet(1, 2, 2, width=4, depth=1, dropout=0.0).eval()
    feats = net.encode(torch.randn(1, 1, 8, 8))
    _, last = net.decode(feats)
    assert torch.allclose(last, net.blocks[0](net.ups[0](feats[1]) + feats[0]))


def test_gradients_reach_every_parameter():
    net = ResUNet(1, 2, 2, width=4, depth=2)
    for s in net.stages:  # zero-initialised BN weights block the gradient of the conv before them
        for b in s:
            nn.init.ones_(b.body[-1].weight)
    net(torch.randn(2, 1, 8, 8)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_bad_input():
    net = ResUNet(1, 2, 2, width=4, depth=3)
    with pytest.raises(ValueError, match=r"divisible by 2\*\*depth=8, got \(20, 16\)"):
        net(torch.zeros(1, 1, 20, 16))
    with pytest.raises(ValueError, match=r"ResUNet expected input \(B, C, H, W\) with C=1, got \(1, 3, 16, 16\)"):
        net(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3, got 1"):
        ResUNet(spatial_dims=1)
    with pytest.raises(ValueError, match=r"blocks >= 1 per stage, got depth=2, width=4, blocks=\(3, 0\)"):
        ResUNet(depth=2, width=4, blocks=(3, 0))
    with pytest.raises(ValueError, match="expected 4 features and index 0, got 4 features and index 1"):
        net.decode(net.eval().encode(torch.zeros(1, 1, 8, 8)), 1)


@pytest.mark.parametrize("make", [lambda: UNet(1, 2, 2, width=4, depth=2, dropout=0.3),
                                  lambda: ResUNet(1, 2, 2, width=4, depth=2)])
def test_checkpointed_pass_equals_a_plain_pass(make):
    torch.manual_seed(0)
    plain, ckpt = make(), make()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 16, 16)
    torch.manual_seed(1)
    y_plain = plain(x)
    torch.manual_seed(1)  # the same dropout masks
    y_ckpt = checkpointed(ckpt, x, net=ckpt)
    assert torch.allclose(y_plain, y_ckpt)
    w = torch.randn_like(y_plain)
    (y_plain * w).sum().backward()
    (y_ckpt * w).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers()):  # running stats moved once, not twice
        assert torch.equal(a, b), name
    assert all(m.momentum == 0.1 for m in ckpt.modules() if isinstance(m, nn.BatchNorm2d))
