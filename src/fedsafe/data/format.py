"""Chat formatting with the tokenizer's template, loss on response tokens only, and batching."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    """One training example: token ids and labels (-100 on the prompt)."""

    input_ids: torch.Tensor
    labels: torch.Tensor


def format_example(tokenizer, instruction: str, response: str, max_length: int,
                   system: str | None = None) -> TokenizedExample | None:
    """Tokenise one pair with the chat template; the loss covers only the assistant's answer.

    Returns None when truncation leaves no response token.
    """
    messages = [{"role": "user", "content": instruction}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                              tokenize=False)
    if not full_text.startswith(prompt_text):  # templates where the prompt is not a prefix
        full_text = prompt_text + response + (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    # strip trailing whitespace tokens after the end-of-turn marker (e.g. ChatML's final "\n")
    ids = torch.tensor(full_ids[:max_length], dtype=torch.long)
    labels = ids.clone()
    n_prompt = min(len(prompt_ids), len(ids))
    labels[:n_prompt] = IGNORE_INDEX
    if (labels != IGNORE_INDEX).sum() == 0:
        return None
    return TokenizedExample(ids, labels)


def tokenize_rows(tokenizer, rows: list[dict], max_length: int, system: str | None = None) -> list[TokenizedExample]:
    """Tokenise rows, dropping the ones whose response is truncated away entirely; a row's own ``system``
    prompt (the system turn of a chat record) takes the place of ``system`` (data.system_prompt)."""
    out = []
    for r in rows:
        ex = format_example(tokenizer, r["instruction"], r["response"], max_length, r.get("system") or system)
        if ex is not None:
            out.append(ex)
    return out


def collate(examples: list[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into input_ids / attention_mask / labels tensors."""
    length = max(len(e.input_ids) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        input_ids[i, :k] = e.input_ids
        labels[i, :k] = e.labels
        attention[i, :k] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


@torch.no_grad()
def mean_loss(model, examples: list[TokenizedExample], pad_token_id: int, batch_size: int = 8) -> float:
    """Token-weighted mean cross-entropy on response tokens (used for held-out loss)."""
    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i: i + batch_size], pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift_logits = logits[:, :-1].float()
        shift_labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                                 shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                                 reduction="sum")
        total += loss.item()
        count += int((shift_labels != IGNORE_INDEX).sum())
    if was_training:
        model.train()
    return total / max(count, 1)
