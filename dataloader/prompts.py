"""The paper's ranking prompt (alpaca_short template), built from cached, truncated item titles.

Each title is tokenised once (to cut it to --llm_max_title_len tokens) and the cut text is cached;
a prompt is assembled from those cached pieces and tokenised once as a whole, so the model sees
exactly `tokenizer(prompt_text)` (assembling token pieces would differ from that at piece
boundaries with SentencePiece tokenizers). Whole-prompt tokenisation costs next to nothing beside the model's
forward pass (docs/performance.md).
"""

import string
from collections.abc import Sequence
from dataclasses import dataclass

from utils.errors import InputError
from utils.settings import flag_field

# The paper's prompt texts (the --llm_system_template / --llm_input_template defaults); PromptBuilder wraps them.
DEFAULT_SYSTEM = (
    "Given user history in chronological order, recommend an item from the candidate pool with its index letter."
)
DEFAULT_INPUT = "User history: {}; \n Candidate pool: {}"

# alpaca_short, as the original's templates/alpaca_short.json
PROMPT_TEMPLATE = "### Instruction:\n{system}\n\n### Input:\n{input}\n\n### Response:\n"


def candidate_letters(count: int) -> list[str]:
    """'A', 'B', ... one per candidate."""
    if not 1 <= count <= 26:
        raise InputError(f"--llm_negative_sample_size: expected 0..25 (candidates A..Z), found {count - 1}")
    return [chr(ord("A") + i) for i in range(count)]


@dataclass(frozen=True)
class PromptConfig:
    """The prompt's texts and lengths (the --llm_* prompt flags); training, evaluation and recommend.py build every
    prompt from one of these."""

    system: str = flag_field("llm_system_template")
    input_template: str = flag_field("llm_input_template")
    max_title_len: int = flag_field("llm_max_title_len")  # tokens kept of each title
    max_text_len: int = flag_field("llm_max_text_len")  # prompt tokens kept (cut from the left)
    max_history: int = flag_field("llm_max_history")  # last history items shown


class PromptBuilder:
    """Prompt text and token ids for (history, candidates); titles cut once and cached per item."""

    def __init__(self, tokenizer, titles: Sequence[str], config: PromptConfig) -> None:
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(config.input_template) if field is not None]
        except ValueError:  # an unmatched brace
            fields = None
        if fields != ["", ""]:
            raise InputError(
                f"--llm_input_template: expected exactly two {{}} (history, candidates) and no other braces "
                f"(write {{{{ }}}} for literal ones), found {config.input_template!r}"
            )
        self.tokenizer = tokenizer
        self.titles = titles
        self.system = config.system
        self.input_template = config.input_template
        self.max_title_len = config.max_title_len
        self.max_text_len = config.max_text_len
        self.max_history = config.max_history
        self._cut_titles: dict[int, str] = {}

    def title(self, item: int) -> str:
        """The item's title cut to max_title_len tokens (tokenised once per item, then cached)."""
        cut = self._cut_titles.get(item)
        if cut is None:
            title = self.titles[item]
            ids = self.tokenizer(title, add_special_tokens=False).input_ids
            if len(ids) > self.max_title_len:
                title = self.tokenizer.decode(ids[: self.max_title_len]).strip()
            cut = self._cut_titles[item] = title
        return cut

    def text(self, history: Sequence[int], candidates: Sequence[int]) -> str:
        """The prompt text, ending with the response marker; history = all earlier items, oldest first."""
        shown = list(history)[-self.max_history :] if self.max_history > 0 else []
        history_text = " \n ".join(f"({i + 1}) {self.title(item)}" for i, item in enumerate(shown))
        letters = candidate_letters(len(candidates)) if candidates else []
        candidate_text = " \n ".join(f"({letters[i]}) {self.title(item)}" for i, item in enumerate(candidates))
        return PROMPT_TEMPLATE.format(
            system=self.system, input=self.input_template.format(history_text, candidate_text)
        )

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a prompt, cut from the left to max_text_len (keeping a leading BOS, if any).

        The end (candidates and the response marker) is what the model must see; the oldest history
        goes first, as the original's truncation_side='left'.
        """
        ids = self.tokenizer(text).input_ids
        if len(ids) <= self.max_text_len:
            return ids
        bos = self.tokenizer.bos_token_id
        keep_bos = bos is not None and ids[0] == bos
        head = [bos] if keep_bos else []
        return head + ids[len(ids) - (self.max_text_len - len(head)) :]

    def encode(self, history: Sequence[int], candidates: Sequence[int]) -> list[int]:
        return self.encode_text(self.text(history, candidates))
