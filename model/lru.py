"""LRURec: the stage-1 retriever (Yue et al., "Linear Recurrent Units for Sequential Recommendation").

Item embedding -> LayerNorm(dropout(.)) -> blocks of [LRU layer + position-wise FFN] -> scores against the
item embedding table plus a bias. The LRU layer is a complex diagonal linear recurrence
h_t = lambda * h_{t-1} + gamma * B x_t,  y_t = LayerNorm(dropout(Re(C h_t)) + x_t).

The complex numbers are kept as real/imaginary halves of real tensors: B is a real Linear(d, 2h) whose
outputs are [Re(Bx) | Im(Bx)], C is a real Linear(2h, d) acting on [Re(h) | Im(h)] (Re(C h) is linear in
both halves). This is the same function class and initialisation as the original's complex layers,
without complex kernels. The recurrence is evaluated as a parallel scan (see `complex_linear_scan`).

Padding (item id 0) is on the left. Padding positions do not feed the recurrence of real positions, so the
outputs at real positions do not depend on how much padding there is; a padding position's own state is
just its input, as in the original's masked scan.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def _scan_(z_re: torch.Tensor, z_im: torch.Tensor, a_re: torch.Tensor, a_im: torch.Tensor, reverse: bool) -> None:
    """In place along dim 1: z_t += a * z_{t-1} for all t (reverse: z_t += a * z_{t+1}).

    Hillis-Steele doubling: after the step with shift s, z_t holds the sum of a^k x_{t-k} for k < 2s.
    log2(L) steps, each a few vectorised operations over the whole [B, L, h] tensor.
    """
    length = z_re.size(1)
    shift = 1
    while shift < length:
        if reverse:
            src_re, src_im, dst_re, dst_im = z_re[:, shift:], z_im[:, shift:], z_re[:, :-shift], z_im[:, :-shift]
        else:
            src_re, src_im, dst_re, dst_im = z_re[:, :-shift], z_im[:, :-shift], z_re[:, shift:], z_im[:, shift:]
        # Complex product a * src computed in full before the in-place add (src and dst overlap).
        t_re = torch.addcmul(a_re * src_re, -a_im, src_im)
        t_im = torch.addcmul(a_re * src_im, a_im, src_re)
        dst_re += t_re
        dst_im += t_im
        a_re, a_im = a_re * a_re - a_im * a_im, 2 * a_re * a_im
        shift *= 2


class ComplexLinearScan(torch.autograd.Function):
    """h_t = lambda * h_{t-1} + x_t along dim 1 (h_{-1} = 0), complex numbers as (re, im) tensor pairs.

    A hand-written backward keeps autograd from recording every doubling step (which costs about twice
    the time on CPU): the adjoint of the recurrence is the same scan run backwards in time with
    conj(lambda), and dL/dlambda = sum_t conj(h_{t-1}) * G_t, G being that adjoint.
    """

    @staticmethod
    def forward(ctx, x_re, x_im, lam_re, lam_im):  # noqa: ANN001, ANN205 - autograd.Function signature
        h_re, h_im = x_re.clone(), x_im.clone()
        _scan_(h_re, h_im, lam_re, lam_im, reverse=False)
        ctx.save_for_backward(h_re, h_im, lam_re, lam_im)
        return h_re, h_im

    @staticmethod
    def backward(ctx, g_re, g_im):  # noqa: ANN001, ANN205
        h_re, h_im, lam_re, lam_im = ctx.saved_tensors
        g_re, g_im = g_re.clone(), g_im.clone()
        _scan_(g_re, g_im, lam_re, -lam_im, reverse=True)
        prev_re, prev_im, nxt_re, nxt_im = h_re[:, :-1], h_im[:, :-1], g_re[:, 1:], g_im[:, 1:]
        grad_lam_re = (nxt_re * prev_re + nxt_im * prev_im).sum((0, 1))
        grad_lam_im = (nxt_im * prev_re - nxt_re * prev_im).sum((0, 1))
        return g_re, g_im, grad_lam_re, grad_lam_im


def complex_linear_scan(
    x_re: torch.Tensor, x_im: torch.Tensor, lam_re: torch.Tensor, lam_im: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel scan h_t = lambda * h_{t-1} + x_t over dim 1 of [B, L, h] tensors; lambda has shape [h]."""
    return ComplexLinearScan.apply(x_re.contiguous(), x_im.contiguous(), lam_re, lam_im)


class Dropout(nn.Module):
    """Inverted dropout like nn.Dropout, about 3x faster on CPU.

    torch's CPU dropout draws one Bernoulli sample per element (about 7 ms for a [16, 200, 256] tensor
    on a 2-core CPU, a fifth of a training step). Here one 64-bit random draw gives four
    15-bit uniforms, so the drop probability is p rounded to a multiple of 2^-15.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * 2**15)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
        # random_() on int64 draws from [0, 2^63): the top 16-bit lane has no sign bit, so keep 15 bits.
        uniform15 = bits.view(torch.int16)[:n].view(x.shape) & 0x7FFF
        keep = (uniform15 >= self.threshold).to(x.dtype)
        return x * (keep * (2**15 / (2**15 - self.threshold)))


class ScoreCrossEntropy(torch.autograd.Function):
    """mean_i CE(hidden_i @ weight^T + bias, target_i), fused; target_i is 1 - smoothing on label_i plus
    smoothing spread evenly over the real items (columns 1..; none on the padding column 0).

    The [positions, items] logits are the largest tensors of a training step. The standard path writes
    them, then log-probabilities, then a zero-filled gradient, then the log-softmax gradient. Here the
    forward keeps the logits and their logsumexp only, and the backward turns the logits into the
    gradient softmax - target in place: about 25% less time for this part on CPU. The saved logits are
    consumed, so backward can run once per forward (the normal case; no retain_graph).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, smoothing):  # noqa: ANN001, ANN205 - autograd.Function signature
        logits = torch.addmm(bias, hidden, weight.t())
        lse = torch.logsumexp(logits, dim=1)
        target = logits.gather(1, labels.view(-1, 1)).squeeze(1)
        if smoothing:
            target = (1 - smoothing) * target + smoothing * logits[:, 1:].mean(1)
        loss = (lse - target).mean()
        ctx.smoothing = smoothing
        ctx.save_for_backward(hidden, weight, logits, lse, labels)
        return loss

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        hidden, weight, logits, lse, labels = ctx.saved_tensors
        grad_logits = logits.sub_(lse.unsqueeze(1)).exp_()
        if ctx.smoothing:
            grad_logits[:, 1:] -= ctx.smoothing / (logits.shape[1] - 1)
        grad_logits[torch.arange(len(labels), device=labels.device), labels] -= 1 - ctx.smoothing
        grad_logits.mul_(grad / len(labels))
        return grad_logits @ weight, grad_logits.t() @ hidden, grad_logits.sum(0), None, None


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        nu, theta, gamma = torch.exp(self.params_log)
        mag = torch.exp(-nu)
        lam_re, lam_im = mag * torch.cos(theta), mag * torch.sin(theta)
        bu = self.in_proj(x) * torch.cat([gamma, gamma])
        real = mask.unsqueeze(-1).to(bu.dtype)
        u = bu * real  # padding does not enter the recurrence of real positions
        # split (not slicing): its backward is a cat, where a slice's backward zero-fills a full-size tensor.
        u_re, u_im = u.split(self.hidden, dim=-1)
        h_re, h_im = complex_linear_scan(u_re, u_im, lam_re, lam_im)
        h = torch.cat([h_re, h_im], -1) + bu * (1 - real)  # a padding position keeps its own input
        return self.layer_norm(self.dropout(self.out_proj(h)) + x)


class PositionwiseFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.dropout = Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dropout(F.gelu(self.w_1(x)))
        return self.layer_norm(self.dropout(self.w_2(y)) + x)


class LRUBlock(nn.Module):
    def __init__(self, d_model: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.lru_layer = LRULayer(d_model, dropout=attn_dropout)
        self.feed_forward = PositionwiseFeedForward(d_model, 4 * d_model, dropout=dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.lru_layer(x, mask))


class NextItemModel(nn.Module):
    """What every retriever shares: item embeddings `token` (row 0 = padding) tied with the output, scores =
    hidden @ token^T + bias over all item ids, and the trainer's interface (encode, next_hidden, training_inputs)."""

    causal = True  # encode()'s state at position t depends on positions <= t only

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, L] left-padded item ids -> [B, L, d]
        raise NotImplementedError

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores over all item ids (column 0 = padding) for hidden states [..., d]."""
        return hidden @ self.token.weight.T + self.bias

    def next_item_loss(self, hidden: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean cross-entropy over all items of hidden states [N, d] against item ids [N]; equals
        F.cross_entropy(self.score(hidden), labels) (tested) at a lower cost. label_smoothing moves that
        share of the target uniformly onto the real items (ids 1..num_items)."""
        return ScoreCrossEntropy.apply(hidden, self.token.weight, self.bias, labels, label_smoothing)

    def training_inputs(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A next-item training window (tokens = items before each label) as this model's own training example."""
        return tokens, labels

    def next_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """The state [B, d] that predicts the item after each row's last item."""
        return self.encode(tokens)[:, -1]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-item scores [B, num_items + 1] after the last position of each sequence."""
        return self.score(self.next_hidden(tokens))


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
        """Hidden states [B, L, d] for left-padded item ids [B, L]."""
        mask = tokens > 0
        x = self.layer_norm(self.embed_dropout(self.token(tokens)))
        for block in self.blocks:
            x = block(x, mask)
        return x


def truncated_normal_init_(model: nn.Module, std: float = 0.02) -> None:
    """Truncated normal (+-2 std) on every parameter except LayerNorms and the LRU's lambda/gamma.

    As the original LRURec: embeddings, projections and all biases (including the output bias) get it.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "params_log" in name:
                continue
            nn.init.trunc_normal_(p, mean=0.0, std=std, a=-2 * std, b=2 * std)
