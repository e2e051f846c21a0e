"""LRURec model properties: scan correctness, causality, padding invariance, initialisation."""

import math

import pytest
import torch

from model.layers import Dropout
from model.lru import ComplexLinearScan, LRULayer, LRURec, complex_linear_scan


def random_lambda(hidden: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    radius = 0.5 + 0.49 * torch.rand(hidden, dtype=dtype)
    angle = 2 * math.pi * torch.rand(hidden, dtype=dtype)
    return radius * torch.cos(angle), radius * torch.sin(angle)


def sequential_scan(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """The plain recurrence h_t = lambda * h_{t-1} + x_t with complex tensors, one step at a time."""
    h = torch.zeros(x.shape[0], x.shape[2], dtype=x.dtype)
    out = []
    for t in range(x.shape[1]):
        h = lam * h + x[:, t]
        out.append(h)
    return torch.stack(out, 1)


# Lengths with full and partial final chunks (chunk = ceil(sqrt(L))): 3 = 2+1, 17 = 5+5+5+2, 199 = 15*13+4.
@pytest.mark.parametrize("length", [1, 2, 3, 7, 16, 17, 50, 199, 200])
def test_chunked_scan_equals_sequential_recurrence(length):
    torch.manual_seed(length)
    x_re, x_im = torch.randn(3, length, 8, dtype=torch.float64), torch.randn(3, length, 8, dtype=torch.float64)
    lam_re, lam_im = random_lambda(8)
    h_re, h_im = complex_linear_scan(torch.cat([x_re, x_im], -1), lam_re, lam_im).chunk(2, -1)
    ref = sequential_scan(torch.complex(x_re, x_im), torch.complex(lam_re, lam_im))
    # float64: agreement to rounding error (the scan reorders the sums)
    torch.testing.assert_close(h_re, ref.real, rtol=0, atol=1e-10)
    torch.testing.assert_close(h_im, ref.imag, rtol=0, atol=1e-10)
    # float32 (what training uses): within 1e-4 of the float64 recurrence (|h| is O(10) here)
    f_re, f_im = complex_linear_scan(torch.cat([x_re, x_im], -1).float(), lam_re.float(), lam_im.float()).chunk(2, -1)
    assert (f_re.double() - ref.real).abs().max() < 1e-4
    assert (f_im.double() - ref.imag).abs().max() < 1e-4


@pytest.mark.parametrize("length", [9, 11])  # 3 full chunks of 3; chunks of 4, 4 and 3
def test_scan_gradient_matches_finite_differences(length):
    torch.manual_seed(0)
    inputs = (
        torch.randn(2, length, 6, dtype=torch.float64, requires_grad=True),  # [Re | Im] of 3 channels
        *(p.requires_grad_() for p in random_lambda(3)),
    )
    assert torch.autograd.gradcheck(ComplexLinearScan.apply, inputs)


def reference_lru_layer(layer: LRULayer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LRULayer written with complex weights and a sequential loop (the original's formulation)."""
    hid = layer.hidden
    nu, theta, gamma = torch.exp(layer.params_log.double())
    lam = torch.exp(torch.complex(-nu, theta))
    w, b = layer.in_proj.weight.double(), layer.in_proj.bias.double()
    bu = (x.to(torch.complex128) @ torch.complex(w[:hid], w[hid:]).T + torch.complex(b[:hid], b[hid:])) * gamma
    h = sequential_scan(bu * mask.unsqueeze(-1), lam)  # zero at (left) padding positions
    c = layer.out_proj.weight.double()
    y = h.real @ c[:, :hid].T + h.imag @ c[:, hid:].T + layer.out_proj.bias.double()
    return torch.nn.functional.layer_norm(
        y + x, (x.shape[-1],), layer.layer_norm.weight.double(), layer.layer_norm.bias.double()
    )


def test_lru_layer_matches_complex_sequential_reference():
    torch.manual_seed(1)
    layer = LRULayer(d_model=6, dropout=0.0).double().eval()
    for p in layer.parameters():  # non-trivial LayerNorm and biases too
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 13, 6, dtype=torch.float64)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[0, :5] = False
    positions = mask.flatten().nonzero().squeeze(1)
    packed = layer(x.flatten(0, 1)[positions], positions, mask.shape)
    torch.testing.assert_close(packed, reference_lru_layer(layer, x, mask).flatten(0, 1)[positions])


def small_model(seed: int = 0) -> LRURec:
    torch.manual_seed(seed)
    return LRURec(num_items=30, hidden_units=16, num_blocks=2, dropout=0.2, attn_dropout=0.2).eval()


def test_causality():
    model = small_model()
    tokens = torch.randint(1, 31, (4, 20))
    changed = tokens.clone()
    changed[:, 12:] = torch.randint(1, 31, (4, 8))
    with torch.no_grad():
        a, b = model.encode(tokens), model.encode(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_left_padding_does_not_change_real_positions():
    model = small_model()
    items = torch.randint(1, 31, (3, 9))
    with torch.no_grad():
        short = model.encode(torch.nn.functional.pad(items, (2, 0)))  # 2 padding ids
        long = model.encode(torch.nn.functional.pad(items, (41, 0)))  # 41 padding ids, not a power of two
        bare = model.encode(items)
        scores_short, scores_long = (
            model(torch.nn.functional.pad(items, (2, 0))),
            model(torch.nn.functional.pad(items, (41, 0))),
        )
    torch.testing.assert_close(short[:, 2:], long[:, 41:], rtol=0, atol=1e-5)
    torch.testing.assert_close(bare, long[:, 41:], rtol=0, atol=1e-5)
    torch.testing.assert_close(scores_short, scores_long, rtol=0, atol=1e-5)


def test_initialisation_statistics():
    torch.manual_seed(0)
    model = LRURec(num_items=2000, hidden_units=64, num_blocks=2)
    weight = model.token.weight
    assert weight.abs().max() <= 0.04 + 1e-7  # truncated at 2 std
    # std of a normal(0, 0.02) truncated at +-2 std is 0.02 * 0.8796
    assert abs(weight.std().item() - 0.02 * 0.8796) < 0.0005
    assert abs(weight.mean().item()) < 0.001
    assert model.bias.abs().max() <= 0.04 + 1e-7 and model.bias.std() > 0.01  # the original inits biases too
    for name, p in model.named_parameters():
        if "layer_norm" in name:
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
    for block in model.blocks:
        nu, theta, gamma = torch.exp(block.lru_layer.params_log)
        radius = torch.exp(-nu)
        assert radius.min() >= 0.8 - 1e-6 and radius.max() <= 0.99 + 1e-6
        assert theta.min() >= 0 and theta.max() <= 2 * math.pi
        torch.testing.assert_close(gamma, torch.sqrt(1 - radius**2))


def test_dropout_rate_scale_and_eval_identity():
    torch.manual_seed(0)
    drop = Dropout(0.2)
    x = torch.ones(1000, 999)
    y = drop(x)
    assert abs((y == 0).float().mean().item() - 0.2) < 0.005
    assert abs(y.mean().item() - 1.0) < 0.01
    assert drop.eval()(x) is x


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_next_item_loss_matches_cross_entropy(smoothing):
    torch.manual_seed(0)
    model = LRURec(num_items=50, hidden_units=16)
    hidden = torch.randn(30, 16, requires_grad=True)
    labels = torch.randint(1, 51, (30,))
    fused = model.next_item_loss(hidden, labels, smoothing)
    fused.backward()
    fused_grads = [hidden.grad.clone(), model.token.weight.grad.clone(), model.bias.grad.clone()]
    hidden.grad, model.token.weight.grad, model.bias.grad = None, None, None
    # target: 1 - smoothing on the label, smoothing spread over the real items 1..50, nothing on padding (0)
    logits = model.score(hidden)
    target = (1 - smoothing) * torch.nn.functional.one_hot(labels, 51).float()
    target[:, 1:] += smoothing / 50
    reference = -(target * logits.log_softmax(1)).sum(1).mean()
    reference.backward()
    assert torch.allclose(fused, reference, atol=1e-6)
    for got, want in zip(fused_grads, [hidden.grad, model.token.weight.grad, model.bias.grad], strict=True):
        assert torch.allclose(got, want, atol=1e-6)
