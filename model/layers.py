"""What every retriever (LRURec, SASRec, BERT4Rec, NARM) shares: the next-item model interface with its output
layer and fused loss, dropout, the position-wise feed-forward block and the truncated-normal initialisation."""

import torch
import torch.nn.functional as F
from torch import nn


class Dropout(nn.Module):
    """Inverted dropout like nn.Dropout, with a cheaper mask (docs/performance.md has the timings).

    torch's CPU dropout draws one Bernoulli sample per element. Here one 64-bit random draw gives four 16-bit
    uniforms, so the drop probability is p rounded to a multiple of 2^-16.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * 2**16) - 2**15  # an int16 lane is uniform on [-2^15, 2^15)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == -(2**15):
            return x
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= self.threshold
        return (x * keep).mul_(2**16 / (2**16 - (self.threshold + 2**15)))


class ScoreCrossEntropy(torch.autograd.Function):
    """mean_i CE(hidden_i @ weight^T + bias, target_i), fused; target_i is 1 - smoothing on label_i plus
    smoothing spread evenly over the real items (columns 1..; none on the padding column 0).

    The [positions, items] logits are the largest tensors of a training step, so every pass over them counts.
    The standard path makes about eight (logits, log-softmax, loss, a zero-filled gradient, its softmax, ...)
    and two exponentials. Here the forward turns the logits in place into e = exp(logits - rowmax) (four passes,
    one exponential) and keeps e with its row sums s. The backward needs no elementwise pass: the gradient
    e / s - target is applied through the two matmuls (and a matrix-vector product for the bias), with 1/s
    folded into their small [positions, d] operand or result and the label and smoothing terms added on the
    small side. The smoothing term needs the mean logit over the items,
    which is hidden @ mean(weight[1:]) + mean(bias[1:]): no pass over the logits either.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, smoothing):  # noqa: ANN001, ANN205 - autograd.Function signature
        logits = (hidden @ weight.t()).add_(bias)  # not addmm: slower on CPU (docs/performance.md)
        target = logits.gather(1, labels.view(-1, 1)).squeeze(1)
        if smoothing:
            mean_logit = hidden @ weight[1:].mean(0) + bias[1:].mean()
            target = (1 - smoothing) * target + smoothing * mean_logit
        row_max = logits.amax(1, keepdim=True)
        exp = logits.sub_(row_max).exp_()
        row_sum = exp.sum(1)
        loss = (row_max.squeeze(1) + row_sum.log() - target).mean()
        ctx.smoothing = smoothing
        ctx.save_for_backward(hidden, weight, exp, row_sum, labels)
        return loss

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        hidden, weight, exp, row_sum, labels = ctx.saved_tensors
        smoothing, n, num_columns = ctx.smoothing, len(labels), weight.shape[0]
        scale = grad / n
        row_scale = (scale / row_sum).unsqueeze(1)  # softmax = exp / row_sum, times dloss/dlogits' 1/n
        label_scale = -(1 - smoothing) * scale
        grad_hidden = (exp @ weight).mul_(row_scale)
        grad_hidden.add_(weight[labels], alpha=label_scale)
        grad_weight = exp.t() @ (hidden * row_scale)
        grad_bias = row_scale.squeeze(1) @ exp
        grad_weight.index_add_(0, labels, hidden, alpha=label_scale)
        grad_bias.index_add_(0, labels, torch.full_like(row_sum, label_scale))
        if smoothing:
            share = smoothing * scale / (num_columns - 1)  # each real item's share of the smoothing target
            grad_hidden.sub_(weight[1:].mean(0), alpha=smoothing * scale)
            grad_weight[1:].sub_(hidden.sum(0), alpha=share)
            grad_bias[1:].sub_(share * n)
        return grad_hidden, grad_weight, grad_bias, None, None


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


def truncated_normal_init_(model: nn.Module, std: float = 0.02) -> None:
    """Truncated normal (+-2 std) on every parameter except LayerNorms and the LRU's lambda/gamma.

    As the original LRURec: embeddings, projections and all biases (including the output bias) get it.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "params_log" in name:
                continue
            nn.init.trunc_normal_(p, mean=0.0, std=std, a=-2 * std, b=2 * std)
