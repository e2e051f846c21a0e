"""NARM (Li et al., "Neural Attentive Session-based Recommendation", CIKM 2017): a GRU encoder with attention.

Item embedding -> dropout -> GRU. At position t the global encoder is the GRU state h_t and the local encoder
attends over the states so far: alpha_tj = v^T sigmoid(A1 h_t + A2 h_j) for real j <= t, c_local = sum_j alpha_tj
h_j. [h_t ; c_local] -> dropout -> the bilinear decoder B (2d -> d) -> scores against the item embeddings (+ bias),
as the other retrievers. The GRU runs over each row's real items only (packed), so left padding changes nothing.
"""

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from model.lru import Dropout, NextItemModel, truncated_normal_init_


def shift_rows(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Row b rolled left by shifts[b] along dim 1: left padding becomes right padding (and back with -shifts)."""
    length = x.shape[1]
    index = (torch.arange(length, device=x.device)[None, :] + shifts[:, None]) % length
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class NARM(NextItemModel):
    def __init__(self, num_items: int, hidden_units: int = 64, num_layers: int = 1, dropout: float = 0.2):
        super().__init__()
        self.num_items = num_items
        self.token = nn.Embedding(num_items + 1, hidden_units)
        self.embed_dropout = Dropout(dropout)
        self.gru = nn.GRU(hidden_units, hidden_units, num_layers=num_layers, batch_first=True)
        self.a_1 = nn.Linear(hidden_units, hidden_units, bias=False)
        self.a_2 = nn.Linear(hidden_units, hidden_units, bias=False)
        self.v = nn.Linear(hidden_units, 1, bias=False)
        self.output_dropout = Dropout(dropout)
        self.decoder = nn.Linear(2 * hidden_units, hidden_units, bias=False)
        self.bias = nn.Parameter(torch.zeros(num_items + 1))
        truncated_normal_init_(self)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        real = tokens > 0
        lengths = real.sum(1)
        pad = tokens.shape[1] - lengths
        x = shift_rows(self.embed_dropout(self.token(tokens)), pad)  # real items first
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        packed_states, _ = self.gru(packed)
        states, _ = pad_packed_sequence(packed_states, batch_first=True, total_length=tokens.shape[1])
        states = shift_rows(states, -pad)  # back to left padding; padding positions hold zeros
        # alpha[b, t, j] for every query position t at once: causal over real positions
        scores = self.v(torch.sigmoid(self.a_1(states)[:, :, None, :] + self.a_2(states)[:, None, :, :])).squeeze(-1)
        allowed = real[:, None, :] & torch.ones_like(scores, dtype=torch.bool).tril()
        local = (scores * allowed).matmul(states)
        return self.decoder(self.output_dropout(torch.cat([states, local], dim=-1)))
