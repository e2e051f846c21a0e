"""The retriever of a run: LRURec (the paper's) or a baseline of the paper's Table 1, built from its sizes.

RETRIEVERS is the registry: a new retriever is a file in model/ with a NextItemModel subclass (its `from_spec`
builds it from a RetrieverSpec) plus one line here; --retriever_model's choices come from it.
"""

from dataclasses import dataclass

from model.bert4rec import BERT4Rec
from model.interface import NextItemModel
from model.lru import LRURec
from model.narm import NARM
from model.sasrec import SASRec
from utils.errors import InputError
from utils.settings import flag_field

RETRIEVERS: dict[str, type[NextItemModel]] = {"lru": LRURec, "sasrec": SASRec, "bert4rec": BERT4Rec, "narm": NARM}
RETRIEVER_MODELS = tuple(RETRIEVERS)


@dataclass(frozen=True)
class RetrieverSpec:
    """What defines a retriever's weights (the --bert_* flags size every model, under the original code's names)."""

    model: str = flag_field("retriever_model")
    max_len: int = flag_field("bert_max_len")
    hidden_units: int = flag_field("bert_hidden_units")
    num_blocks: int = flag_field("bert_num_blocks")  # NARM: one GRU layer
    dropout: float = flag_field("bert_dropout")
    attn_dropout: float = flag_field("bert_attn_dropout")
    heads: int = flag_field("attn_heads")  # sasrec, bert4rec
    mask_prob: float = flag_field("bert_mask_prob")  # bert4rec


def build_retriever(spec: RetrieverSpec, num_items: int) -> NextItemModel:
    """A freshly initialised retriever over item ids 1..num_items (0 = padding)."""
    if spec.model not in RETRIEVERS:
        raise InputError(f"--retriever_model: expected one of {', '.join(RETRIEVERS)}, found {spec.model!r}")
    return RETRIEVERS[spec.model].from_spec(spec, num_items)
