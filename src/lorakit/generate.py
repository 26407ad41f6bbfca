"""Text generation with a base model and optional adapters: batched, left-padded, stopping at EOS."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.data import format_alpaca_prompt, stop_token_ids


@dataclass
class SamplingConfig:
    """How tokens are chosen.

    Args:
        max_new_tokens (int): Longest answer in tokens. Default 128.
        greedy (bool): Always take the most likely token (ignores temperature and top_p). Default True.
        temperature (float): Softmax temperature when sampling. Default 0.7.
        top_p (float): Nucleus sampling mass when sampling. Default 0.9.
        seed (int | None): Seed for sampling. Default None.
    """

    max_new_tokens: int = 128
    greedy: bool = True
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int | None = None


def render_prompt(prompt: str, template: str, tokenizer, input_text: str = "") -> str:
    """Wrap a user prompt in a template: ``"alpaca"``, ``"chat"`` (the tokenizer's chat template) or
    ``"none"`` (the prompt as is)."""
    if template == "alpaca":
        return format_alpaca_prompt(prompt, input_text)
    if template == "chat":
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


@torch.no_grad()
def generate_text(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    sampling: SamplingConfig | None = None,
    batch_size: int = 16,
) -> list[str]:
    """Complete each prompt; returns only the new text, cut at the first stop token.

    Args:
        model (nn.Module): A causal LM (with or without adapters).
        tokenizer: Its tokenizer.
        prompts (list[str]): Already templated prompts.
        sampling (SamplingConfig | None): Decoding settings; greedy by default.
        batch_size (int): Prompts generated together (left-padded). Default 16.

    Returns:
        list[str]: One completion per prompt, in order.
    """
    sampling = sampling or SamplingConfig()
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer)
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
        longest = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), longest), dtype=torch.long)
        for row, ids in enumerate(encoded):  # left padding: every prompt ends at the same position
            input_ids[row, longest - len(ids) :] = torch.tensor(ids)
            attention[row, longest - len(ids) :] = 1
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=pad_id, eos_token_id=stops or None)
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=None)
        generated = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs
        )
        for row in generated[:, longest:].tolist():
            cut = next((i for i, token in enumerate(row) if token in stops), len(row))
            outputs.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    model.train(was_training)
    return outputs
