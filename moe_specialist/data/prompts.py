"""Translation prompts: the only place that decides what the model is asked.

Every consumer (calibration, SFT examples, evaluation, the demo generalist's own pre-training) goes through these
functions, so a prompt change cannot make training and evaluation disagree.
"""

from __future__ import annotations

from moe_specialist.data.example import ParallelExample
from moe_specialist.errors import ConfigurationError

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


def encode_prompt_completion(tokenizer, example: ParallelExample, reference_index: int = 0) -> tuple[list, list]:
    """Token ids of the prompt and of the completion (the reference and the end-of-turn), as the model sees them.

    The completion is what follows the prompt in the full rendering, so the split matches TRL's completion mask.
    """
    record = sft_record(tokenizer, example, reference_index)
    if has_chat_template(tokenizer):
        prompt = tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(record["prompt"] + record["completion"], tokenize=False)
        if not full.startswith(prompt):
            raise ConfigurationError("The chat template renders the prompt differently with and without the reply.")
        completion = full[len(prompt) :]
    else:
        prompt, completion = record["prompt"], record["completion"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return prompt_ids, completion_ids
