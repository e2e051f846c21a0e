"""LRURec: the stage-1 retriever (Yue et al., "Linear Recurrent Units for Sequential Recommendation").

Item embedding -> LayerNorm(dropout(.)) -> blocks of [LRU layer + position-wise FFN] -> scores against the
item embedding table plus a bias. The LRU layer is a complex diagonal linear recurrence
h_t = lambda * h_{t-1} + gamma * B x_t,  y_t = LayerNorm(dropout(Re(C h_t)) + x_t).

The complex numbers are kept as real/imaginary halves of real tensors: B is a real Linear(d, 2h) whose
outputs are [Re(Bx) | Im(Bx)], C is a real Linear(2h, d) acting on [Re(h) | Im(h)] (Re(C h) is linear in
both halves). This is the same function class and initialisation as the original's complex layers,
without complex kernels. The recurrence is evaluated as a chunked scan (see `complex_linear_scan`).

Padding (item id 0) is on the left. Padding positions do not feed the recurrence of real positions, so the
outputs at real positions do not depend on how much padding there is. A padding position's state is zero (the
original keeps its input there); nothing reads the outputs at padding positions.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.interface import NextItemModel
from model.layers import Dropout, PositionwiseFeedForward, truncated_normal_init_


def _powers(a_re: torch.Tensor, a_im: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Re and Im of a^1 .. a^count, shape [count, h]."""
    p_re, p_im = [a_re], [a_im]
    for _ in range(count - 1):
        re, im = p_re[-1], p_im[-1]
        p_re.append(re * a_re - im * a_im)
        p_im.append(re * a_im + im * a_re)
    return torch.stack(p_re), torch.stack(p_im)


def _scan_(z_re: torch.Tensor, z_im: torch.Tensor, a_re: torch.Tensor, a_im: torch.Tensor, reverse: bool) -> None:
    """In place along dim 1: z_t += a * z_{t-1} for all t (reverse: z_t += a * z_{t+1}).

    Two-level sequential scan: the L positions form chunks of C ~ sqrt(L). First every chunk is scanned on its
    own, all chunks at once (C - 1 steps, each on the strided [B, L/C, h] slice of one offset); then each chunk
    adds a^(t+1) times the final state of the chunk before it, chunk after chunk (L/C - 1 steps). About 2 sqrt(L)
    small in-place steps and one pass of work over the tensor, where a log2(L)-step doubling scan passes over the
    whole [B, L, h] tensor at every one of its steps.
    """
    length = z_re.size(1)
    chunk = math.isqrt(max(length - 1, 0)) + 1  # ceil(sqrt(L)) for L > 1
    for t in range(chunk - 2, -1, -1) if reverse else range(1, chunk):
        if reverse:  # position t of every chunk takes from position t + 1 of the same chunk
            src_re, src_im = z_re[:, t + 1 :: chunk], z_im[:, t + 1 :: chunk]
            dst_re, dst_im = z_re[:, t::chunk][:, : src_re.size(1)], z_im[:, t::chunk][:, : src_re.size(1)]
        else:  # a final partial chunk has no position t: the source is cut to the destination's length
            dst_re, dst_im = z_re[:, t::chunk], z_im[:, t::chunk]
            src_re, src_im = z_re[:, t - 1 :: chunk][:, : dst_re.size(1)], z_im[:, t - 1 :: chunk][:, : dst_re.size(1)]
        dst_re.addcmul_(src_re, a_re).addcmul_(src_im, a_im, value=-1)
        dst_im.addcmul_(src_im, a_re).addcmul_(src_re, a_im)
    chunks = -(-length // chunk)
    if chunks == 1:
        return
    p_re, p_im = _powers(a_re, a_im, chunk)
    if reverse:  # position t of a chunk is C - t steps before the next chunk's first position
        p_re, p_im = p_re.flip(0), p_im.flip(0)
    for k in range(chunks - 2, -1, -1) if reverse else range(1, chunks):
        lo, hi = k * chunk, min((k + 1) * chunk, length)
        carry = hi if reverse else lo - 1  # the neighbouring chunk's state, already final
        src_re, src_im = z_re[:, carry : carry + 1], z_im[:, carry : carry + 1]
        c_re, c_im = p_re[: hi - lo], p_im[: hi - lo]
        z_re[:, lo:hi].addcmul_(src_re, c_re).addcmul_(src_im, c_im, value=-1)
        z_im[:, lo:hi].addcmul_(src_im, c_re).addcmul_(src_re, c_im)


class ComplexLinearScan(torch.autograd.Function):
    """h_t = lambda * h_{t-1} + x_t along dim 1 (h_{-1} = 0) for x = [Re x | Im x] on the last dim.

    A hand-written backward keeps autograd from recording every small step of the scan: the adjoint of the
    recurrence is the same scan run backwards in time with conj(lambda), and dL/dlambda =
    sum_t conj(h_{t-1}) * G_t, G being that adjoint.
    """

    @staticmethod
    def forward(ctx, x, lam_re, lam_im):  # noqa: ANN001, ANN205 - autograd.Function signature
        h = x.clone(memory_format=torch.contiguous_format)
        h_re, h_im = h.chunk(2, -1)
        _scan_(h_re, h_im, lam_re, lam_im, reverse=False)
        ctx.save_for_backward(h, lam_re, lam_im)
        return h

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        h, lam_re, lam_im = ctx.saved_tensors
        g = grad.clone(memory_format=torch.contiguous_format)
        g_re, g_im = g.chunk(2, -1)
        _scan_(g_re, g_im, lam_re, -lam_im, reverse=True)
        h_re, h_im = h.chunk(2, -1)
        prev_re, prev_im, nxt_re, nxt_im = h_re[:, :-1], h_im[:, :-1], g_re[:, 1:], g_im[:, 1:]
        grad_lam_re = (nxt_re * prev_re + nxt_im * prev_im).sum((0, 1))
        grad_lam_im = (nxt_im * prev_re - nxt_re * prev_im).sum((0, 1))
        return g, grad_lam_re, grad_lam_im


def complex_linear_scan(x: torch.Tensor, lam_re: torch.Tensor, lam_im: torch.Tensor) -> torch.Tensor:
    """Scan h_t = lambda * h_{t-1} + x_t over dim 1 of x [B, L, 2h] = [Re | Im]; lambda has shape [h]."""
    return ComplexLinearScan.apply(x, lam_re, lam_im)


class LRULayer(nn.Module):
    """Diagonal complex linear recurrence with ring initialisation, residual and LayerNorm."""

    def __init__(self, d_model: int, dropout: float, r_min: float = 0.8, r_max: float = 0.99):
        super().__init__()
        self.hidden = 2 * d_model
        # Ring init (Orvieto et al. 2023): |lambda| uniform on the ring [r_min, r_max] in squared radius,
        # phase uniform in [0, 2 pi]; gamma = sqrt(1 - |lambda|^2) normalises the state's variance.
        u1, u2 = torch.rand(self.hidden), torch.rand(self.hidden)
        nu_log = torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2))
        theta_log = torch.log(u2 * 2 * math.pi)
        gamma_log = 0.5 * torch.log(1 - torch.exp(-2 * torch.exp(nu_log)))
        self.params_log = nn.Parameter(torch.stack([nu_log, theta_log, gamma_log]))
        self.in_proj = nn.Linear(d_model, 2 * self.hidden)  # [Re(B x + b) | Im(B x + b)]
        self.out_proj = nn.Linear(2 * self.hidden, d_model)  # Re(C h + c) from [Re h | Im h]
        self.dropout = Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """x [N, d]: the states of the N real (non-padding) positions, at flat indices `positions` of the
        [B, L] = `shape` batch. The recurrence runs on the padded [B, L] layout, with zeros at padding."""
        nu, theta, gamma = torch.exp(self.params_log)
        mag = torch.exp(-nu)
        lam_re, lam_im = mag * torch.cos(theta), mag * torch.sin(theta)
        # gamma * (B x + b), with gamma applied to the small weight and bias instead of the [N, 2h] output
        gamma2 = torch.cat([gamma, gamma])
        bu = F.linear(x, self.in_proj.weight * gamma2.unsqueeze(1), self.in_proj.bias * gamma2)
        padded = bu.new_zeros(shape[0] * shape[1], bu.shape[1]).index_copy(0, positions, bu)
        h = complex_linear_scan(padded.view(*shape, -1), lam_re, lam_im).flatten(0, 1).index_select(0, positions)
        return self.layer_norm(self.dropout(self.out_proj(h)) + x)


class LRUBlock(nn.Module):
    def __init__(self, d_model: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.lru_layer = LRULayer(d_model, dropout=attn_dropout)
        self.feed_forward = PositionwiseFeedForward(d_model, 4 * d_model, dropout=dropout)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        return self.feed_forward(self.lru_layer(x, positions, shape))


class LRURec(NextItemModel):
    def __init__(
        self,
        num_items: int,
        hidden_units: int = 64,
        num_blocks: int = 2,
        dropout: float = 0.2,
        attn_dropout: float = 0.2,
    ):
        super().__init__()
        self.num_items = num_items
        self.token = nn.Embedding(num_items + 1, hidden_units)  # id 0 = padding
        self.embed_dropout = Dropout(dropout)
        self.layer_norm = nn.LayerNorm(hidden_units)
        self.blocks = nn.ModuleList([LRUBlock(hidden_units, dropout, attn_dropout) for _ in range(num_blocks)])
        self.bias = nn.Parameter(torch.zeros(num_items + 1))
        truncated_normal_init_(self)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, L, d] for left-padded item ids [B, L] (zeros at padding positions).

        Everything but the recurrence is position-wise, so it runs on the real positions only, packed
        into [N, d] (about half of a training batch's positions are padding)."""
        positions = (tokens.flatten() > 0).nonzero().squeeze(1)
        x = self.layer_norm(self.embed_dropout(self.token(tokens.flatten().index_select(0, positions))))
        for block in self.blocks:
            x = block(x, positions, tokens.shape)
        hidden = x.new_zeros(tokens.numel(), x.shape[1]).index_copy(0, positions, x)
        return hidden.view(*tokens.shape, -1)
