"""Translation prompts: the only place that decides what the model is asked.

Every consumer (calibration, SFT examples, evaluation, the demo generalist's own pre-training) goes through these
functions, so a prompt change cannot make training and evaluation disagree.

GPT-OSS's harmony format gets its own shape: the reply is a message on a channel, and left alone the model first
writes an ``analysis`` channel that can use the whole token budget. The prompt is rendered with low reasoning effort
and prefilled with the ``final`` channel header, so the model's first token is the translation; the SFT completion
is then the reference and the end token the template itself writes after a final reply (``<|return|>``).
"""

from __future__ import annotations

from moe_specialist.data.example import ParallelExample
from moe_specialist.errors import ConfigurationError

# The user turn. Short on purpose: the demo model pays for every prompt token, real LLMs understand it as well.
TRANSLATION_INSTRUCTION = "Translate from {src_name} to {tgt_name}:\n{source}"
# Used when the tokenizer has no chat template (base models): the completion follows the target-language name.
PLAIN_TEMPLATE = "{instruction}\n{tgt_name}:"

# Harmony (GPT-OSS): the header of the user-visible channel, and the special tokens that end a message.
HARMONY_FINAL = "<|channel|>final<|message|>"
HARMONY_STOPS = ("<|return|>", "<|end|>", "<|call|>")
HARMONY_TOKENS = ("<|start|>", "<|channel|>", "<|message|>", *HARMONY_STOPS)
HARMONY_TEMPLATE_KWARGS = {"reasoning_effort": "low"}


def translation_instruction(example: ParallelExample) -> str:
    return TRANSLATION_INSTRUCTION.format(
        src_name=example.src.name, tgt_name=example.tgt.name, source=example.source.strip()
    )


def prompt_messages(example: ParallelExample) -> list[dict[str, str]]:
    """The conversation whose assistant reply is the translation."""
    return [{"role": "user", "content": translation_instruction(example)}]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def is_harmony(tokenizer) -> bool:
    """Whether ``tokenizer`` speaks GPT-OSS's harmony format: its chat template writes a ``final`` channel.

    Such a template with the channel markers missing from the vocabulary would be tokenized as plain text: refused.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not (isinstance(template, str) and HARMONY_FINAL in template):
        return False
    missing = [t for t in HARMONY_TOKENS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        raise ConfigurationError(
            f"The chat template is GPT-OSS's harmony format but the tokenizer has no token for {', '.join(missing)}: "
            "load the tokenizer that belongs to the model (the one saved with its chat template)."
        )
    return True


def render_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """``messages`` through the chat template (low reasoning effort for harmony templates)."""
    kwargs = HARMONY_TEMPLATE_KWARGS if is_harmony(tokenizer) else {}
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


def format_prompt(tokenizer, example: ParallelExample) -> str:
    """The text the model continues with its translation (chat template when the tokenizer has one)."""
    if has_chat_template(tokenizer):
        prompt = render_chat(tokenizer, prompt_messages(example), add_generation_prompt=True)
        return prompt + HARMONY_FINAL if is_harmony(tokenizer) else prompt
    return PLAIN_TEMPLATE.format(instruction=translation_instruction(example), tgt_name=example.tgt.name)


def rendered_completion(tokenizer, messages: list[dict[str, str]], prompt: str) -> str:
    """What follows ``prompt`` when the template renders ``messages`` (ending with the assistant's reply) whole."""
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ConfigurationError(
            "The chat template renders the prompt differently with and without the reply, so the reply's tokens "
            "cannot be told apart: use a chat template whose generation prompt is a prefix of the rendered reply."
        )
    return full[len(prompt) :]


def sft_record(tokenizer, example: ParallelExample, reference_index: int = 0) -> dict:
    """A TRL prompt-completion record (completion-only loss).

    Conversational when a chat template exists; plain text for harmony (the prefilled prompt, and the reference with
    the end token, as the template renders a final reply) and for base models.
    """
    target = example.references[reference_index].strip()
    if is_harmony(tokenizer):
        prompt = format_prompt(tokenizer, example)
        reply = {"role": "assistant", "content": target}
        return {
            "prompt": prompt,
            "completion": rendered_completion(tokenizer, [*prompt_messages(example), reply], prompt),
        }
    if has_chat_template(tokenizer):
        return {
            "prompt": prompt_messages(example),
            "completion": [{"role": "assistant", "content": target}],
        }
    return {"prompt": format_prompt(tokenizer, example), "completion": " " + target + (tokenizer.eos_token or "")}


def encode_prompt_completion(tokenizer, example: ParallelExample, reference_index: int = 0) -> tuple[list, list]:
    """Token ids of the prompt and of the completion (the reference and the end-of-turn), as the model sees them.

    The completion is what follows the prompt in the full rendering, so the split matches TRL's completion mask.
    """
    record = sft_record(tokenizer, example, reference_index)
    if isinstance(record["prompt"], str):
        prompt, completion = record["prompt"], record["completion"]
    else:
        prompt = render_chat(tokenizer, record["prompt"], add_generation_prompt=True)
        completion = rendered_completion(tokenizer, record["prompt"] + record["completion"], prompt)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return prompt_ids, completion_ids
