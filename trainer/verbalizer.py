"""Verbalizer: candidate scores = the last prompt position's logits at the letter tokens.

The letter token ids come from tokenising prompt + letter and taking what follows the prompt, i.e. the
very token the model is trained to emit after "### Response:\\n". With Llama-2 that is 29909 for "A",
while `tokenizer.encode("A")` gives 319 ('▁A'): the original read logits of tokens it never trained.
"""

from pathlib import Path

import torch

from dataloader.prompts import PromptBuilder, candidate_letters
from utils.errors import InputError
from utils.files import atomic_write_json


def letter_token_ids(builder: PromptBuilder, count: int) -> dict[str, int]:
    """Letter -> token id from in-context tokenisation; fails clearly when a letter is not one token.

    Probed on a real prompt of this template, so the check covers what training and evaluation see:
    tokenise(prompt + letter) must be tokenise(prompt) followed by exactly one token.
    """
    letters = candidate_letters(count)
    prompt = builder.text([], [])  # the same template end ("### Response:\n") as every real prompt
    prompt_ids = builder.tokenizer(prompt).input_ids
    ids = {}
    for letter in letters:
        full = builder.tokenizer(prompt + letter).input_ids
        if full[: len(prompt_ids)] != prompt_ids or len(full) != len(prompt_ids) + 1:
            tail = builder.tokenizer.convert_ids_to_tokens(full[len(prompt_ids) - 1 :])
            raise InputError(
                f"--llm_base_tokenizer: expected the answer letter {letter!r} to be one token after the prompt, "
                f"found the prompt end + letter tokenised as {tail}"
            )
        ids[letter] = full[-1]
    if len(set(ids.values())) != len(ids):
        raise InputError(f"--llm_base_tokenizer: expected distinct letter tokens, found {ids}")
    return ids


def check_training_target(dataset, letter_ids: dict[str, int]) -> None:
    """A real training example's target token must be the verbalizer's token for its true letter, and
    tokenising that example's prompt text + letter must give exactly its prompt ids + that token."""
    if len(dataset) == 0:
        return
    history, candidates, label = dataset.example(0)
    letter = candidate_letters(len(candidates))[label]
    item = dataset[0]
    text = dataset.builder.text(history, candidates)
    in_context = dataset.builder.tokenizer(text + letter).input_ids
    if item["targets"][0] != letter_ids[letter] or (
        len(in_context) <= dataset.builder.max_text_len and in_context != item["prompt_ids"] + [item["targets"][0]]
    ):
        raise InputError(
            f"--llm_base_tokenizer: training target for {letter!r} (token {item['targets'][0]}) differs from the "
            f"verbalizer token {letter_ids[letter]} or from the in-context tokenisation of prompt + letter"
        )


def verbalizer_scores(last_logits: torch.Tensor, letter_ids: torch.Tensor) -> torch.Tensor:
    """[B, vocab] logits at the last prompt position -> [B, num_candidates] scores (fp32)."""
    return last_logits.index_select(-1, letter_ids).float()


def save_verbalizer(path: Path, letters: dict[str, int], eos_token_id: int | None, tokenizer_name: str) -> None:
    """verbalizer.json: the letter -> token id map every score of the run reads."""
    atomic_write_json(
        path,
        {
            "letters": letters,
            "eos_token_id": eos_token_id,
            "derived_from": "tokenise(prompt + letter): the token after the prompt's '### Response:\\n'",
            "tokenizer": tokenizer_name,
        },
    )
