"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018): causal self-attention.

Item embedding x sqrt(d) + learned position embedding -> dropout -> blocks of [pre-LayerNorm causal multi-head
attention + residual, pre-LayerNorm point-wise feed-forward (ReLU) + residual] -> LayerNorm -> scores against the
item embeddings (+ bias), as the other retrievers. Position ids count from each sequence's first real item, so the
states of real positions do not depend on the left padding (as LRURec's); position t attends to real positions
<= t only (a padding position to itself, so no row is empty).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.interface import NextItemModel
from model.layers import Dropout, SelfAttention, attention_mask, position_ids, truncated_normal_init_


class SASRecBlock(nn.Module):
    def __init__(self, d_model: int, heads: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.attn_layer_norm = nn.LayerNorm(d_model)
        self.attention = SelfAttention(d_model, heads, attn_dropout)
        self.ffn_layer_norm = nn.LayerNorm(d_model)
        self.w_1, self.w_2 = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attn_layer_norm(x), mask))
        y = self.ffn_layer_norm(x)
        return x + self.dropout(self.w_2(self.dropout(F.relu(self.w_1(y)))))


class SASRec(NextItemModel):
    def __init__(
        self,
        num_items: int,
        max_len: int,
        hidden_units: int = 64,
        num_blocks: int = 2,
        heads: int = 2,
        dropout: float = 0.2,
        attn_dropout: float = 0.2,
    ):
        super().__init__()
        self.num_items = num_items
        self.token = nn.Embedding(num_items + 1, hidden_units)
        self.position = nn.Embedding(max_len + 1, hidden_units)
        self.embed_dropout = Dropout(dropout)
        self.blocks = nn.ModuleList(
            [SASRecBlock(hidden_units, heads, dropout, attn_dropout) for _ in range(num_blocks)]
        )
        self.layer_norm = nn.LayerNorm(hidden_units)
        self.bias = nn.Parameter(torch.zeros(num_items + 1))
        truncated_normal_init_(self)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token(tokens) * math.sqrt(self.token.embedding_dim) + self.position(position_ids(tokens))
        x = self.embed_dropout(x)
        mask = attention_mask(tokens, causal=True)
        for block in self.blocks:
            x = block(x, mask)
        return self.layer_norm(x)
