"""The next-item model interface every retriever implements; the trainer, evaluation and export use only this.

A retriever is one file in model/ with a NextItemModel subclass and one line in model/retrievers.py's RETRIEVERS.
"""

import dataclasses
import inspect
from typing import TYPE_CHECKING

import torch
from torch import nn

from model.loss import ScoreCrossEntropy

if TYPE_CHECKING:  # type hints only: model/retrievers.py imports every retriever, which import this module
    from model.retrievers import RetrieverSpec


class NextItemModel(nn.Module):
    """What every retriever shares: item embeddings `token` (row 0 = padding) tied with the output, scores =
    hidden @ token^T + bias over all item ids, and the trainer's interface (encode, next_hidden, training_inputs).

    A subclass sets `num_items`, `token` (nn.Embedding(num_items + 1, d)) and `bias` (nn.Parameter of
    num_items + 1 zeros) and implements `encode`; `causal`, `from_spec` and the other methods have defaults.
    """

    causal = True  # encode()'s state at position t depends on positions <= t only

    @classmethod
    def from_spec(cls, spec: "RetrieverSpec", num_items: int) -> "NextItemModel":
        """A freshly initialised model over item ids 1..num_items (0 = padding): cls(num_items, ...) with each field
        of the run's spec that the constructor names as a parameter (hidden_units, num_blocks, max_len, dropout,
        attn_dropout, heads, mask_prob); the constructor raises an InputError naming the flag for sizes it cannot
        take."""
        takes = inspect.signature(cls).parameters
        return cls(num_items, **{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name in takes})

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
