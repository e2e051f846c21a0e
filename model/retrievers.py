"""The retriever of a run: LRURec (the paper's) or a baseline of the paper's Table 1, built from its sizes."""

from dataclasses import dataclass

from model.bert4rec import BERT4Rec
from model.layers import NextItemModel
from model.lru import LRURec
from model.narm import NARM
from model.sasrec import SASRec
from utils.errors import InputError
from utils.settings import flag_field

RETRIEVER_MODELS = ("lru", "sasrec", "bert4rec", "narm")


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
    sizes = {"hidden_units": spec.hidden_units, "dropout": spec.dropout}
    if spec.model == "lru":
        return LRURec(num_items, num_blocks=spec.num_blocks, attn_dropout=spec.attn_dropout, **sizes)
    if spec.model == "narm":
        return NARM(num_items, **sizes)
    if spec.hidden_units % spec.heads:
        raise InputError(
            f"--attn_heads: expected a divisor of --bert_hidden_units {spec.hidden_units}, found {spec.heads}"
        )
    attention = {"max_len": spec.max_len, "num_blocks": spec.num_blocks, "heads": spec.heads}
    if spec.model == "sasrec":
        return SASRec(num_items, **attention, attn_dropout=spec.attn_dropout, **sizes)
    if spec.model == "bert4rec":
        return BERT4Rec(num_items, **attention, attn_dropout=spec.attn_dropout, mask_prob=spec.mask_prob, **sizes)
    raise InputError(f"--retriever_model: expected one of {', '.join(RETRIEVER_MODELS)}, found {spec.model!r}")
