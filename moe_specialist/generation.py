"""Batched greedy generation of translations: left padding, KV cache, an explicit ``max_new_tokens`` always."""

from __future__ import annotations

import re

import torch
from tqdm.auto import tqdm

from moe_specialist.data.example import ParallelExample
from moe_specialist.data.prompts import HARMONY_FINAL, HARMONY_STOPS, format_prompt, is_harmony
from moe_specialist.errors import ConfigurationError

SPECIAL_TOKEN = re.compile(r"<\|[a-z_]+\|>")
HARMONY_STOP = re.compile("|".join(re.escape(t) for t in HARMONY_STOPS))


def decode_reply(tokenizer, tokens: list[int]) -> str:
    """The reply's text.

    Harmony models (GPT-OSS) write channels: the project's prompt opens the ``final`` channel, so the reply starts
    inside it and ends at the first end-of-message token; a reply that opens a ``final`` channel itself (after an
    analysis) is read from its last one.
    """
    raw = tokenizer.decode(tokens, skip_special_tokens=False)
    if not (HARMONY_FINAL in raw or is_harmony(tokenizer)):
        return tokenizer.decode(tokens, skip_special_tokens=True).strip()
    final = HARMONY_STOP.split(raw.rsplit(HARMONY_FINAL, 1)[-1], maxsplit=1)[0]
    return SPECIAL_TOKEN.sub("", final).strip()


def stop_token_ids(model, tokenizer) -> set[int]:
    """The model's end-of-sequence ids, the tokenizer's, and for harmony every end-of-message token."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    if is_harmony(tokenizer):
        ids |= {tokenizer.convert_tokens_to_ids(t) for t in HARMONY_STOPS}
    ids.discard(None)
    return ids


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
    synced_gpus: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts`` (order kept). Prompts are sorted by length to waste little padding.

    ``synced_gpus``: every process keeps stepping until all are done, as a ZeRO-3 model's forward needs all ranks.
    """
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
    eos_ids = stop_token_ids(model, tokenizer)
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
                synced_gpus=synced_gpus,
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
