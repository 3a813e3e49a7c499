"""GPT-OSS's harmony format with its real chat template: prompts that open the final channel at low reasoning
effort, SFT completions (reference + ``<|return|>``) as TRL labels them, and generation that stops and decodes there.
"""

from __future__ import annotations

import datetime
import hashlib
import socket
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerFast

from moe_specialist.calibrate import encode_calibration_data
from moe_specialist.data.example import ParallelExample
from moe_specialist.data.prompts import encode_prompt_completion, format_prompt, is_harmony, sft_record
from moe_specialist.errors import ConfigurationError
from moe_specialist.generation import decode_reply, generate_texts, translate
from moe_specialist.stats import ROLES
from tests.conftest import TOKENIZER_DIR
from tests.tiny_models import tiny_model

TEMPLATE = Path(__file__).parent / "fixtures" / "gpt_oss_chat_template.jinja"
# The harmony special tokens GPT-OSS's tokenizer adds (the demo tokenizer already has <|end|> and <|endoftext|>).
HARMONY_SPECIALS = ["<|startoftext|>", "<|start|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>"]
EXAMPLE = ParallelExample("x", "eng_Latn", "fra_Latn", " Good morning. ", ("Bonjour.", "Bon matin."))


def harmony_tokenizer() -> PreTrainedTokenizerFast:
    """The demo tokenizer with GPT-OSS's special tokens, end-of-sequence and padding tokens, and chat template."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR)
    tokenizer.add_special_tokens({"additional_special_tokens": HARMONY_SPECIALS})
    tokenizer.eos_token, tokenizer.pad_token = "<|return|>", "<|endoftext|>"
    tokenizer.chat_template = TEMPLATE.read_text()
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return harmony_tokenizer()


def expected_prompt(user: str) -> str:
    """GPT-OSS's system message at low effort, the user turn, and the assistant turn opened on the final channel."""
    return (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        f"Knowledge cutoff: 2024-06\nCurrent date: {datetime.date.today():%Y-%m-%d}\n\nReasoning: low\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
        f"<|start|>user<|message|>{user}<|end|><|start|>assistant<|channel|>final<|message|>"
    )


def test_the_fixture_is_openais_template_unchanged():
    """The text after the provenance comment is the Hub's file: its git blob id is the one the header cites."""
    header, body = TEMPLATE.read_text().split("-#}\n", 1)
    data = body.encode()
    assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == "dc7bb11927d29f653ba2740f2db2c688fd77592f"
    assert "openai/gpt-oss-20b" in header and "Apache-2.0" in header


def test_the_prompt_opens_the_final_channel_at_low_effort(tokenizer):
    assert is_harmony(tokenizer)
    assert format_prompt(tokenizer, EXAMPLE) == expected_prompt("Translate from English to French:\nGood morning.")


def test_the_sft_completion_is_the_reference_and_the_return_token(tokenizer):
    prompt = format_prompt(tokenizer, EXAMPLE)
    record = sft_record(tokenizer, EXAMPLE, reference_index=1)
    assert record == {"prompt": prompt, "completion": "Bon matin.<|return|>"}
    conversation = [
        {"role": "user", "content": "Translate from English to French:\nGood morning."},
        {"role": "assistant", "content": "Bon matin."},
    ]
    whole = tokenizer.apply_chat_template(conversation, tokenize=False, reasoning_effort="low")
    assert record["prompt"] + record["completion"] == whole  # exactly how the template renders a final reply

    prompt_ids, completion_ids = encode_prompt_completion(tokenizer, EXAMPLE, reference_index=1)
    assert prompt_ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(completion_ids) == "Bon matin.<|return|>"
    assert completion_ids[-1] == tokenizer.convert_tokens_to_ids("<|return|>")
    assert tokenizer.convert_ids_to_tokens(prompt_ids[-5:]) == ["<|channel|>", "f", "in", "al", "<|message|>"]

    ((_, ids, roles),) = encode_calibration_data(tokenizer, {"en-fr": [EXAMPLE]})
    target = [t for t, r in zip(ids, roles, strict=True) if r == ROLES.index("target")]
    assert tokenizer.decode(target) == "Bonjour.<|return|>" and ids[: len(ids) - len(target)] == prompt_ids


def test_trl_labels_exactly_the_translation_and_its_end_token(tokenizer, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = tiny_model(
        "gpt_oss", vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id
    )
    args = SFTConfig(
        output_dir=str(tmp_path), max_length=512, completion_only_loss=True, report_to=[], use_cpu=True, max_steps=1
    )
    data = Dataset.from_list([sft_record(tokenizer, EXAMPLE, reference_index=i) for i in (0, 1)])
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    for i, row in enumerate(trainer.train_dataset):
        prompt_ids, completion_ids = encode_prompt_completion(tokenizer, EXAMPLE, reference_index=i)
        assert row["input_ids"] == prompt_ids + completion_ids
        assert row["labels"] == [-100] * len(prompt_ids) + completion_ids
        assert tokenizer.decode(completion_ids) == EXAMPLE.references[i] + "<|return|>"


def test_a_harmony_template_without_its_tokens_is_refused(demo_tokenizer):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR)
    tokenizer.chat_template = TEMPLATE.read_text()
    with pytest.raises(ConfigurationError, match=r"no token for <\|start\|>, <\|channel\|>, <\|message\|>, <\|re"):
        format_prompt(tokenizer, EXAMPLE)
    assert not is_harmony(demo_tokenizer)


@pytest.mark.parametrize(
    "text, reply",
    [
        ("Bonjour.<|return|>", "Bonjour."),
        ("Bonjour.<|end|><|start|>assistant<|channel|>analysis<|message|>Done.", "Bonjour."),
        ("Bonjour", "Bonjour"),  # cut by max_new_tokens: what was written
        ("<|channel|>analysis<|message|>French.<|end|><|start|>assistant<|channel|>final<|message|>Salut.", "Salut."),
    ],
)
def test_a_harmony_reply_is_the_final_channel_up_to_its_end(tokenizer, text, reply):
    assert decode_reply(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"]) == reply


class ScriptedModel:
    """A tiny GPT-OSS whose LM head is overridden to write ``script`` token by token; records its first input."""

    def __init__(self, tokenizer, script: list[int]):
        self.model = tiny_model(
            "gpt_oss", vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id
        )
        # GPT-OSS's own generation config: <|return|> and <|endoftext|> end a sequence, <|end|> does not.
        self.model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(["<|return|>", "<|endoftext|>"])
        self.script, self.steps, self.inputs = script, 0, []
        self.model.lm_head.register_forward_hook(self.force)
        self.model.model.embed_tokens.register_forward_hook(lambda module, args, out: self.inputs.append(args[0]))

    def force(self, module, args, logits: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(logits, -1e4)
        forced[..., self.script[self.steps]] = 0.0
        self.steps += 1
        return forced


@pytest.mark.parametrize("end", ["<|return|>", "<|end|>"])
def test_generation_continues_the_final_channel_and_stops_at_its_end(tokenizer, end):
    text = tokenizer("Bonjour le monde.", add_special_tokens=False)["input_ids"]
    after = tokenizer("<|start|>assistant<|channel|>analysis<|message|>x", add_special_tokens=False)["input_ids"]
    scripted = ScriptedModel(tokenizer, text + [tokenizer.convert_tokens_to_ids(end)] + after)
    assert translate(scripted.model, tokenizer, [EXAMPLE], max_new_tokens=32) == ["Bonjour le monde."]
    assert scripted.steps == len(text) + 1  # stopped on the end token
    assert tokenizer.decode(scripted.inputs[0][0]) == format_prompt(tokenizer, EXAMPLE)


@pytest.fixture
def one_rank_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_synced_generation_gives_the_same_reply(tokenizer, one_rank_group):
    """``synced_gpus`` reaches ``generate`` (it all-reduces the finished flags each step) and changes no output."""
    text = tokenizer("Salut.", add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|return|>")]
    prompt = format_prompt(tokenizer, EXAMPLE)
    replies = {}
    for synced in (False, True):
        scripted = ScriptedModel(tokenizer, text)
        with patch.object(dist, "all_reduce", wraps=dist.all_reduce) as all_reduce:
            replies[synced] = generate_texts(scripted.model, tokenizer, [prompt], max_new_tokens=8, synced_gpus=synced)
        assert (all_reduce.call_count > 0) == synced  # the finished flags are shared at every step
        assert scripted.steps == len(text)
    assert replies[True] == replies[False] == ["Salut."]
