"""Bad and edge-case inputs to the public ops, on both implementations: the compiled kernel and the
reference twin (forced by making ``_build.get_kernel`` find no kernel). Each bad input gets the same
ValueError, naming the op and the argument, whichever path would have run."""
import math

import pytest
import torch

from minissl import ops
from minissl.ops import _build

F64 = torch.float64


@pytest.fixture(params=["kernel", "reference"])
def impl(request, monkeypatch):
    """Run the public ops on the compiled kernels (skipped when they are not built) or on the references."""
    if request.param == "reference":
        monkeypatch.setattr(_build, "get_kernel", lambda name, device_type="cpu": None)
    elif _build.load() is None:  # raises when MINISSL_REQUIRE_EXT=1 and the build fails
        pytest.skip(f"kernels not built: {_build.build_info()['error'] or 'MINISSL_NO_EXT=1'}")
    return request.param


def _used(op: str, impl: str, before: dict) -> None:
    """The call since ``before`` ran the implementation ``impl`` asked for."""
    key = "cpu" if impl == "kernel" else "reference"
    assert ops.kernel_status().calls[op].get(key, 0) == before.get(key, 0) + 1, f"{op} did not run the {impl}"


def _calls(op: str) -> dict:
    return dict(ops.kernel_status().calls[op])


def _ellipse(a: float = 5.0, b: float = 3.0, dtype=F64) -> torch.Tensor:
    return torch.tensor([[8.0, 7.0, a, b, 0.3]], dtype=dtype)  # (1, 5)


ONE = torch.ones(1, dtype=torch.bool)
GEN = torch.Generator().manual_seed(0)
LOGITS, LABELS = torch.randn(2, 3, 4, 4, generator=GEN), torch.randint(0, 3, (2, 4, 4), generator=GEN)
A, B_ = [torch.zeros(2, 8, 8)], [torch.ones(2, 8, 8)]
BOX = torch.tensor([[0, 0, 4, 4], [2, 2, 8, 8]])

CATALOGUE = [  # (case, call, error text)
    ("dice: integer logits", lambda: ops.dice_ce_entropy(LABELS[:, None], LABELS),
     r"dice_ce_entropy: expected logits of dtype torch.float32 or torch.float64, got torch.int64"),
    ("dice: 3-dim logits", lambda: ops.dice_ce_entropy(LOGITS[0], LABELS[0]),
     r"dice_ce_entropy: expected logits with 4 or 5 dims, got shape \(3, 4, 4\)"),
    ("dice: label shape", lambda: ops.dice_ce_entropy(LOGITS, LABELS[:, :3]),
     r"dice_ce_entropy: expected label target of shape \(2, 4, 4\), got \(2, 3, 4\)"),
    ("dice: label too large", lambda: ops.dice_ce_entropy(LOGITS, LABELS.clamp(1, 2) + (LABELS == 2)),
     r"dice_ce_entropy: expected labels in \[0, 3\), got values in \[1, 3\]"),
    ("dice: negative label", lambda: ops.dice_ce_entropy(LOGITS, LABELS - 1),
     r"dice_ce_entropy: expected labels in \[0, 3\), got values in \[-1, 1\]"),
    ("dice: int32 labels", lambda: ops.dice_ce_entropy(LOGITS, LABELS.int()),
     r"dice_ce_entropy: expected target of dtype torch.int64 \(labels\) or floating \(soft targets\), got torch.int32"),
    ("dice: soft target shape", lambda: ops.dice_ce_entropy(LOGITS, torch.rand(2, 2, 4, 4)),
     r"dice_ce_entropy: expected soft target of shape \(2, 3, 4, 4\) \(same as logits\), got \(2, 2, 4, 4\)"),
    ("dice: weight shape", lambda: ops.dice_ce_entropy(LOGITS, LABELS, torch.ones(2, 4)),
     r"dice_ce_entropy: expected weight with 3 dims, got shape \(2, 4\)"),
    ("lcc: float labels", lambda: ops.largest_component(torch.zeros(1, 4, 4)),
     r"largest_component: expected labels of dtype torch.int64 or torch.uint8 or torch.bool, got torch.float32"),
    ("lcc: 2-dim labels", lambda: ops.largest_component(torch.zeros(4, 4, dtype=torch.long)),
     r"largest_component: expected labels with 3 or 4 dims, got shape \(4, 4\)"),
    ("lcc: label >= num_classes", lambda: ops.largest_component(torch.tensor([[[0, 1], [2, 3]]]), 3),
     r"largest_component: expected labels in \[0, 3\), got max 3"),
    ("lcc: stray huge label", lambda: ops.largest_component(torch.tensor([[[0, 1], [1, 10 ** 12]]])),
     r"largest_component: expected labels below 65536 \(num_classes defaults to max \+ 1\), got max 1000000000000"),
    ("lcc: negative label", lambda: ops.largest_component(torch.tensor([[[0, -2], [1, 1]]])),
     r"largest_component: expected labels >= 0, got min -2"),
    ("lcc: num_classes 0", lambda: ops.largest_component(torch.zeros(1, 2, 2, dtype=torch.long), 0),
     r"largest_component: expected num_classes an int in \[1, 65536\], got 0"),
    ("lcc: num_classes float", lambda: ops.largest_component(torch.zeros(1, 2, 2, dtype=torch.long), 2.0),
     r"largest_component: expected num_classes an int in \[1, 65536\], got 2.0"),
    ("fit: float masks", lambda: ops.fit_ellipse(torch.zeros(1, 4, 4)),
     r"fit_ellipse: expected masks of dtype torch.uint8 or torch.bool, got torch.float32"),
    ("fit: 2-dim mask", lambda: ops.fit_ellipse(torch.zeros(4, 4, dtype=torch.uint8)),
     r"fit_ellipse: expected masks with 3 dims, got shape \(4, 4\)"),
    ("fit points: (N, 3)", lambda: ops.fit_ellipse_points(torch.zeros(8, 3)),
     r"fit_ellipse_points: expected points of a floating dtype and shape \(N, 2\), got torch.float32 \(8, 3\)"),
    ("mask: NaN params", lambda: ops.ellipse_mask(_ellipse(a=math.nan), ONE, (16, 16)),
     r"ellipse_mask: expected params finite with semi-axes a, b > 0 in valid rows, got row 0: \[8.0, 7.0, nan"),
    ("mask: negative axis", lambda: ops.ellipse_mask(_ellipse(b=-3.0), ONE, (16, 16)),
     r"ellipse_mask: expected params finite with semi-axes a, b > 0 in valid rows, got row 0: .*-3.0"),
    ("mask: uint8 valid", lambda: ops.ellipse_mask(_ellipse(), ONE.to(torch.uint8), (16, 16)),
     r"ellipse_mask: expected valid of dtype torch.bool, got torch.uint8"),
    ("mask: negative shape", lambda: ops.ellipse_mask(_ellipse(), ONE, (-1, 16)),
     r"ellipse_mask: expected shape \(H, W\) of non-negative ints, got \(-1, 16\)"),
    ("refine: zero axis", lambda: ops.ellipse_refine(torch.rand(1, 16, 16), _ellipse(a=0.0), ONE),
     r"ellipse_refine: expected params finite with semi-axes a, b > 0 in valid rows, got row 0: \[8.0, 7.0, 0.0"),
    ("refine: negative axes", lambda: ops.ellipse_refine(torch.rand(1, 16, 16), _ellipse(-5.0, -3.0), ONE),
     r"ellipse_refine: expected params finite with semi-axes a, b > 0 in valid rows"),
    ("refine: float16 params", lambda: ops.ellipse_refine(torch.rand(1, 16, 16), _ellipse(dtype=torch.float16), ONE),
     r"ellipse_refine: expected params of dtype torch.float32 or torch.float64 and shape \(B, 5\), got torch.float16"),
    ("refine: batch mismatch", lambda: ops.ellipse_refine(torch.rand(2, 16, 16), _ellipse(), ONE),
     r"ellipse_refine: expected params of shape \(2, 5\), got \(1, 5\)"),
    ("refine: integer probs", lambda: ops.ellipse_refine(torch.ones(1, 16, 16, dtype=torch.long), _ellipse(), ONE),
     r"ellipse_refine: expected probs of dtype torch.float32 or torch.float64, got torch.int64"),
    ("hc: negative axis", lambda: ops.head_circumference(_ellipse(b=-1.0), 0.2),
     r"head_circumference: expected params finite with semi-axes a, b >= 0, got row 0"),
    ("mix: box outside", lambda: ops.mix(A, B_, boxes=torch.tensor([[0, 0, 4, 9], [0, 0, 1, 1]])),
     r"mix: expected boxes with 0 <= lo <= hi <= \(8, 8\)"),
    ("mix: box lo > hi", lambda: ops.mix(A, B_, boxes=torch.tensor([[4, 0, 2, 8], [0, 0, 1, 1]])),
     r"mix: expected boxes with 0 <= lo <= hi <= \(8, 8\)"),
    ("mix: boxes and blocks", lambda: ops.mix(A, B_, boxes=BOX, blocks=torch.ones(2, 2, 2, dtype=torch.bool)),
     r"mix: expected exactly one of boxes / blocks, got both"),
    ("mix: grid not dividing", lambda: ops.mix(A, B_, blocks=torch.ones(2, 3, 2, dtype=torch.bool)),
     r"mix: expected spatial size \(8, 8\) divisible by the grid \(3, 2\)"),
    ("mix: a and b differ", lambda: ops.mix(A, [torch.ones(2, 8, 8, dtype=F64)], boxes=BOX),
     r"mix: expected b\[0\] like a\[0\] \(2, 8, 8\) torch.float32 cpu, got \(2, 8, 8\) torch.float64 cpu"),
    ("mix: batch of boxes", lambda: ops.mix(A, B_, boxes=BOX[:1]),
     r"mix: expected a\[0\] of shape \(1, \[C,\] \*S \(2 dims\)\), got \(2, 8, 8\)"),
    ("mix: empty lists", lambda: ops.mix([], [], boxes=BOX),
     r"mix: expected a and b to be non-empty sequences of equal length, got lengths 0 and 0"),
]


@pytest.mark.parametrize("case,call,match", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_is_refused_on_both_paths(impl, case, call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_empty_batch_gives_empty_outputs_on_both_paths(impl):
    stats = ops.dice_ce_entropy(torch.randn(0, 3, 4, 4), torch.zeros(0, 4, 4, dtype=torch.long))
    assert stats.intersect.shape == (0, 3) and stats.ce.shape == (0,)
    assert ops.largest_component(torch.zeros(0, 4, 4, dtype=torch.long)).shape == (0, 4, 4)
    params, valid = ops.fit_ellipse(torch.zeros(0, 4, 4, dtype=torch.uint8))
    assert params.shape == (0, 5) and valid.shape == (0,)
    none = torch.zeros(0, dtype=torch.bool)
    assert ops.ellipse_mask(torch.zeros(0, 5, dtype=F64), none, (4, 4)).shape == (0, 4, 4)
    refined, pseudo = ops.ellipse_refine(torch.zeros(0, 4, 4), torch.zeros(0, 5, dtype=F64), none)
    assert refined.shape == pseudo.shape == (0, 4, 4)
    assert ops.mix([torch.zeros(0, 4, 4)], [torch.ones(0, 4, 4)], boxes=torch.zeros(0, 4, dtype=torch.long))[0].shape \
        == (0, 4, 4)


def test_dice_ce_entropy_second_derivative_on_both_paths(impl):
    """Double backward through the kernel gave 0 silently; now both paths give the true second derivative."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 3, 4, generator=g, dtype=F64, requires_grad=True)  # (B, C, H, W)
    labels = torch.randint(0, 3, (2, 3, 4), generator=g)  # (B, H, W)
    weight = torch.rand(2, 3, 4, generator=g, dtype=F64)  # (B, H, W)

    def loss(x):
        s = ops.dice_ce_entropy(x, labels, weight, squared=True)
        dice = 1 - 2 * s.intersect / (s.pred_sum + s.target_sum)  # (B, C)
        return dice.mean() + s.ce.sum() / s.weight_sum.sum() + 0.1 * s.entropy.sum()

    before = _calls("dice_ce_entropy")
    (grad,) = torch.autograd.grad(loss(logits), logits, create_graph=True)  # (B, C, H, W)
    _used("dice_ce_entropy", impl, before)
    v = torch.randn(logits.shape, generator=g, dtype=F64)  # (B, C, H, W)
    (hvp,) = torch.autograd.grad((grad * v).sum(), logits)  # (B, C, H, W) Hessian-vector product
    eps = 1e-6  # central difference of the gradient along v
    plus, minus = (logits.detach() + s * eps * v for s in (1, -1))
    g_plus, g_minus = (torch.autograd.grad(loss(x.requires_grad_()), x)[0] for x in (plus, minus))
    torch.testing.assert_close(hvp, (g_plus - g_minus) / (2 * eps), rtol=1e-5, atol=1e-7)
    assert hvp.abs().max() > 1e-3
    assert torch.autograd.gradgradcheck(lambda x: tuple(ops.dice_ce_entropy(x, labels, weight)), (logits,),
                                        eps=1e-6, atol=1e-5)


def test_ellipse_degenerate_axes_have_one_rule(impl):
    """Zero axes gave NaN in the kernel and finite values in the reference; negative axes were drawn by one
    and ignored by the other; float16 params passed one and not the other. Now: rows that count must be
    finite with a, b > 0 and params float32/float64, on both paths; rows with valid False may hold anything."""
    probs = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))  # (B, H, W)
    params = torch.tensor([[8.0, 7.0, 5.0, 3.0, 0.3], [0.0, 0.0, 0.0, 0.0, 0.0], [math.nan, 1, -2, 0, 0]], dtype=F64)
    valid = torch.tensor([True, False, False])
    before = _calls("ellipse_refine")
    refined, pseudo = ops.ellipse_refine(probs, params, valid)
    _used("ellipse_refine", impl, before)
    assert torch.isfinite(refined).all() and torch.equal(refined[1:], probs[1:])
    assert ops.ellipse_mask(params, valid, (16, 16))[1:].sum() == 0
    for bad in (_ellipse(a=0.0), _ellipse(b=-3.0), _ellipse(-5.0, -3.0)):
        for call in (lambda: ops.ellipse_refine(probs[:1], bad, ONE), lambda: ops.ellipse_mask(bad, ONE, (16, 16))):
            with pytest.raises(ValueError, match="semi-axes a, b > 0 in valid rows"):
                call()
    for call in (lambda: ops.ellipse_refine(probs[:1], _ellipse(dtype=torch.float16), ONE),
                 lambda: ops.ellipse_mask(_ellipse(dtype=torch.float16), ONE, (16, 16))):
        with pytest.raises(ValueError, match="params of dtype torch.float32 or torch.float64"):
            call()
    mask32 = ops.ellipse_mask(_ellipse(dtype=torch.float32), ONE, (16, 16))
    assert torch.equal(mask32, ops.ellipse_mask(_ellipse(), ONE, (16, 16))) and mask32.sum() > 0


def test_largest_component_sparse_label_values_on_both_paths(impl):
    """A large label value (below the limit) used to make the reference loop over every class up to it."""
    labels = torch.zeros(2, 32, 32, dtype=torch.long)  # (B, H, W)
    labels[0, 2:6, 2:6] = 60000
    labels[0, 20:22, 20:22] = 60000  # a smaller second component of the same class
    labels[1, 5:9, 5:9] = 3
    before = _calls("largest_component")
    out = ops.largest_component(labels)
    _used("largest_component", impl, before)
    assert int(out[0].eq(60000).sum()) == 16 and int(out[1].eq(3).sum()) == 16
    with pytest.raises(ValueError, match=r"largest_component: expected labels in \[0, 4\), got max 60000"):
        ops.largest_component(labels, 4)
