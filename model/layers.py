"""The layers the retrievers (LRURec, SASRec, BERT4Rec, NARM) share: dropout, the position-wise feed-forward block,
multi-head self-attention with its padding-aware mask and position ids, and the truncated-normal initialisation."""

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import InputError


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


def position_ids(tokens: torch.Tensor) -> torch.Tensor:
    """0 at each row's first real item, counting up; padding gets 0 (its state is never read)."""
    return ((tokens > 0).long().cumsum(1) - 1).clamp(min=0)


def attention_mask(tokens: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, 1, L, L] boolean, True = may attend: real keys (causal: at or before the query), plus the diagonal."""
    length = tokens.shape[1]
    allowed = (tokens > 0)[:, None, None, :].expand(-1, 1, length, -1)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()
    return allowed | torch.eye(length, dtype=torch.bool, device=tokens.device)


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        if d_model % heads:  # equal heads; in flag terms, as the sizes come from the flags
            raise InputError(f"--attn_heads: expected a divisor of --bert_hidden_units {d_model}, found {heads}")
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, d = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(batch, length, d))


def truncated_normal_init_(model: nn.Module, std: float = 0.02) -> None:
    """Truncated normal (+-2 std) on every parameter except LayerNorms and the LRU's lambda/gamma.

    As the original LRURec: embeddings, projections and all biases (including the output bias) get it.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "params_log" in name:
                continue
            nn.init.trunc_normal_(p, mean=0.0, std=std, a=-2 * std, b=2 * std)
