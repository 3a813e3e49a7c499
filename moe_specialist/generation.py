"""Batched greedy generation of translations: left padding, KV cache, an explicit ``max_new_tokens`` always."""

from __future__ import annotations

import re

import torch
from tqdm.auto import tqdm

from moe_specialist.data.example import ParallelExample
from moe_specialist.data.prompts import format_prompt
from moe_specialist.errors import ConfigurationError

HARMONY_CHANNEL = "<|channel|>"
HARMONY_FINAL = "<|channel|>final<|message|>"


def decode_reply(tokenizer, tokens: list[int]) -> str:
    """The reply's text. Harmony models (GPT-OSS) write channels: keep the ``final`` channel, drop the analysis."""
    raw = tokenizer.decode(tokens, skip_special_tokens=False)
    if HARMONY_CHANNEL not in raw:
        return tokenizer.decode(tokens, skip_special_tokens=True).strip()
    final = raw.rsplit(HARMONY_FINAL, 1)[1] if HARMONY_FINAL in raw else ""
    return re.sub(r"<\|[a-z_]+\|>", "", final).strip()


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: list[str],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 256,
    no_repeat_ngram_size: int = 0,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Greedy continuations of ``prompts`` (order kept). Prompts are sorted by length to waste little padding."""
    if max_new_tokens <= 0:
        raise ConfigurationError(f"max_new_tokens must be positive, got {max_new_tokens}.")
    if tokenizer.pad_token_id is None:
        raise ConfigurationError("The tokenizer has no pad token: set tokenizer.pad_token before generating.")
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    eos_ids.discard(None)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            index = order[start : start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in index]}, return_tensors="pt").to(device)
            generated = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                no_repeat_ngram_size=no_repeat_ngram_size,
                eos_token_id=sorted(eos_ids),
                pad_token_id=tokenizer.pad_token_id,
                output_router_logits=False,
                use_cache=True,
            )
            new_tokens = generated[:, batch["input_ids"].shape[1] :]
            for i, row in zip(index, new_tokens.tolist(), strict=False):
                cut = next((k for k, t in enumerate(row) if t in eos_ids), len(row))
                outputs[i] = decode_reply(tokenizer, row[:cut])
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return outputs


def translate(model, tokenizer, examples: list[ParallelExample], **kwargs) -> list[str]:
    """Translations of ``examples`` through the project's prompt (chat template when the tokenizer has one)."""
    return generate_texts(model, tokenizer, [format_prompt(tokenizer, ex) for ex in examples], **kwargs)
