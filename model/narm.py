"""NARM (Li et al., "Neural Attentive Session-based Recommendation", CIKM 2017): a GRU encoder with attention.

Item embedding -> dropout -> GRU. At position t the global encoder is the GRU state h_t and the local encoder
attends over the states so far: alpha_tj = v^T sigmoid(A1 h_t + A2 h_j) for real j <= t, c_local = sum_j alpha_tj
h_j. [h_t ; c_local] -> dropout -> the bilinear decoder B (2d -> d) -> scores against the item embeddings (+ bias),
as the other retrievers. The GRU runs over each row's real items only, so left padding changes nothing.
"""

import torch
from torch import nn

from model.interface import NextItemModel
from model.layers import Dropout, truncated_normal_init_


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

    def gru_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """GRU states [B, L, d] for left-padded item ids [B, L], zeros at padding positions."""
        real = tokens > 0
        pad = tokens.shape[1] - real.sum(1)
        # Real items first (right padding): the GRU state at a real position then depends on real items only, and
        # one unpacked GRU call over the whole batch costs far less than a packed one.
        states, _ = self.gru(shift_rows(self.embed_dropout(self.token(tokens)), pad))
        return shift_rows(states, -pad) * real.unsqueeze(-1)  # back to left padding

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        states = self.gru_states(tokens)
        local = local_encoding(self, states, tokens > 0)
        return self.decoder(self.output_dropout(torch.cat([states, local], dim=-1)))

    def next_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        # Evaluation needs the last position only: its local attention is [B, L], not encode's [B, L, L].
        states = self.gru_states(tokens)
        last = states[:, -1:]
        local = attention_pool(self, self.a_1(last), self.a_2(states), states, (tokens > 0)[:, None])
        return self.decoder(self.output_dropout(torch.cat([last, local], dim=-1)))[:, 0]


def local_encoding(model: NARM, states: torch.Tensor, real: torch.Tensor, chunks: int = 8) -> torch.Tensor:
    """c_local[b, t] = sum_j alpha_tj h_j over real j <= t, alpha_tj = v^T sigmoid(A1 h_t + A2 h_j), for every t.

    The [B, T, T, d] sigmoid term is the step's largest cost; query positions go in chunks, each against the
    keys up to its own last position only, which skips ~45% of the pairs that causality zeroes anyway.
    """
    length = states.shape[1]
    query, key = model.a_1(states), model.a_2(states)
    local = []
    for start in range(0, length, -(-length // chunks)):
        end = min(length, start + -(-length // chunks))
        allowed = real[:, None, :end] & torch.ones(end - start, end, dtype=torch.bool, device=real.device).tril(start)
        local.append(attention_pool(model, query[:, start:end], key[:, :end], states[:, :end], allowed))
    return torch.cat(local, dim=1)


def attention_pool(
    model: NARM, query: torch.Tensor, key: torch.Tensor, states: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """sum_j alpha_qj states_j over allowed j, alpha_qj = v^T sigmoid(query_q + key_j); query [B, Q, d] = A1 h,
    key [B, K, d] = A2 h, states [B, K, d], allowed [B, Q, K] -> [B, Q, d]."""
    scores = model.v(torch.sigmoid(query[:, :, None, :] + key[:, None, :, :])).squeeze(-1)
    return (scores * allowed).matmul(states)
