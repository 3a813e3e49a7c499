"""Translation prompts: the only place that decides what the model is asked.

Every consumer (calibration, SFT examples, evaluation, the demo generalist's own pre-training) goes through these
functions, so a prompt change cannot make training and evaluation disagree.
"""

from __future__ import annotations

from moe_specialist.data.example import ParallelExample

# The user turn. Short on purpose: the demo model pays for every prompt token, real LLMs understand it as well.
TRANSLATION_INSTRUCTION = "Translate from {src_name} to {tgt_name}:\n{source}"
# Used when the tokenizer has no chat template (base models): the completion follows the target-language name.
PLAIN_TEMPLATE = "{instruction}\n{tgt_name}:"


def translation_instruction(example: ParallelExample) -> str:
    return TRANSLATION_INSTRUCTION.format(
        src_name=example.src.name, tgt_name=example.tgt.name, source=example.source.strip()
    )


def prompt_messages(example: ParallelExample) -> list[dict[str, str]]:
    """The conversation whose assistant reply is the translation."""
    return [{"role": "user", "content": translation_instruction(example)}]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, example: ParallelExample) -> str:
    """The text the model continues with its translation (chat template when the tokenizer has one)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(prompt_messages(example), tokenize=False, add_generation_prompt=True)
    return PLAIN_TEMPLATE.format(instruction=translation_instruction(example), tgt_name=example.tgt.name)


def sft_record(tokenizer, example: ParallelExample, reference_index: int = 0) -> dict:
    """A TRL prompt-completion record (completion-only loss); conversational when a chat template exists."""
    target = example.references[reference_index].strip()
    if has_chat_template(tokenizer):
        return {
            "prompt": prompt_messages(example),
            "completion": [{"role": "assistant", "content": target}],
        }
    return {"prompt": format_prompt(tokenizer, example), "completion": " " + target + (tokenizer.eos_token or "")}
