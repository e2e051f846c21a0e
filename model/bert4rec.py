"""BERT4Rec (Sun et al., CIKM 2019): a bidirectional Transformer trained to fill masked items (a cloze task).

Item embedding + learned position embedding -> LayerNorm, dropout -> post-LayerNorm Transformer blocks (multi-head
self-attention over every real position, GELU feed-forward) -> scores against the item embeddings (+ bias). The
mask token has its own embedding (id num_items + 1 in inputs, never a score column). Training: each item of a
window is replaced by the mask token with probability --bert_mask_prob (at least one per window) and the loss is
taken at the masked positions only. Prediction of the next item: the history (its last max_len - 1 items) followed
by the mask token, read at that last position.
"""

import torch
from torch import nn

from model.interface import NextItemModel
from model.layers import (
    Dropout,
    PositionwiseFeedForward,
    SelfAttention,
    attention_mask,
    position_ids,
    truncated_normal_init_,
)


class BERT4RecBlock(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.attention = SelfAttention(d_model, heads, attn_dropout)
        self.dropout = Dropout(dropout)
        self.attn_layer_norm = nn.LayerNorm(d_model)
        self.feed_forward = PositionwiseFeedForward(d_model, 4 * d_model, dropout)  # GELU, residual, LayerNorm

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attn_layer_norm(x + self.dropout(self.attention(x, mask)))
        return self.feed_forward(x)


class BERT4Rec(NextItemModel):
    causal = False  # every position sees the whole window

    def __init__(
        self,
        num_items: int,
        max_len: int,
        hidden_units: int = 64,
        num_blocks: int = 2,
        heads: int = 2,
        dropout: float = 0.2,
        attn_dropout: float = 0.2,
        mask_prob: float = 0.2,
    ):
        super().__init__()
        self.num_items = num_items
        self.mask_id = num_items + 1
        self.max_len = max_len
        self.mask_prob = mask_prob
        self.token = nn.Embedding(num_items + 1, hidden_units)
        self.mask_embedding = nn.Parameter(torch.zeros(hidden_units))
        self.position = nn.Embedding(max_len + 1, hidden_units)
        self.layer_norm = nn.LayerNorm(hidden_units)
        self.embed_dropout = Dropout(dropout)
        self.blocks = nn.ModuleList(
            [BERT4RecBlock(hidden_units, heads, dropout, attn_dropout) for _ in range(num_blocks)]
        )
        self.bias = nn.Parameter(torch.zeros(num_items + 1))
        truncated_normal_init_(self)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        masked = tokens == self.mask_id
        x = self.token(tokens.masked_fill(masked, 0))
        x = torch.where(masked.unsqueeze(-1), self.mask_embedding.to(x.dtype), x)
        x = self.embed_dropout(self.layer_norm(x + self.position(position_ids(tokens))))
        mask = attention_mask(tokens, causal=False)
        for block in self.blocks:
            x = block(x, mask)
        return x

    def training_inputs(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-item window -> cloze example: the window's items (tokens are the items before each label, so the
        items are tokens[1:] + the last label), each masked with probability mask_prob; labels only there."""
        items = torch.cat([tokens[:, 1:], labels[:, -1:]], dim=1)
        real = items > 0
        chosen = (torch.rand(items.shape, device=items.device) < self.mask_prob) & real
        none = ~chosen.any(1)
        chosen[none, -1] = real[none, -1]  # at least one masked item per window: its last
        return items.masked_fill(chosen, self.mask_id), items.masked_fill(~chosen, 0)

    def next_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] >= self.max_len:
            tokens = tokens[:, tokens.shape[1] - self.max_len + 1 :]
        query = torch.full((len(tokens), 1), self.mask_id, dtype=tokens.dtype, device=tokens.device)
        return self.encode(torch.cat([tokens, query], dim=1))[:, -1]
