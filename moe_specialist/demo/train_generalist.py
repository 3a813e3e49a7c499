"""Train the embedded demo generalist: a tiny Qwen3-MoE (32 experts, top-4) that translates between six languages.

It stands in for GPT-OSS-20B / Qwen3-30B-A3B in the demo and the tests, so it is trained as a *generalist*: many
translation directions plus monolingual text, with per-layer load balancing so that no expert is dead (pruning a
collapsed model is too easy and proves nothing).

    OMP_NUM_THREADS=2 python -m moe_specialist.demo.train_generalist --output_dir runs/generalist

The defaults are the committed model's run: 10,000 steps (41M tokens, about 4 hours on 2 CPU cores).

The learning-rate schedule is warmup-stable-decay: the run can be extended (resume with a larger ``--max_steps``) as
long as it has not entered its final decay. Resuming is automatic from ``output_dir/checkpoint.pt``; every batch is a
pure function of (seed, step), so a resumed run sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import HfArgumentParser, PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

from moe_specialist.data.bible import bible_examples, load_verses, translations_for, verse_ids
from moe_specialist.data.example import ParallelExample
from moe_specialist.data.languages import get_language
from moe_specialist.data.prompts import format_prompt, translation_instruction
from moe_specialist.demo.tokenizer import END_OF_TEXT, END_OF_TURN, train_tokenizer
from moe_specialist.errors import ConfigurationError
from moe_specialist.generation import translate
from moe_specialist.io import atomic_torch_save, atomic_write_json, staging_dir
from moe_specialist.metrics import score_translations

logger = logging.getLogger("moe_specialist.demo")

LANGUAGES = ("en", "fr", "de", "es", "it", "pt")
# Relative weight of each translation direction; unlisted directions weigh 1. The evaluation directions and their
# reverses weigh more, English-centric directions a little more, every one of the 30 directions is present.
DIRECTION_WEIGHTS = {"en-fr": 6.0, "de-en": 6.0, "fr-en": 3.0, "en-de": 3.0}
ENGLISH_CENTRIC_WEIGHT = 2.0
SOURCE_MARKER = "\u0000SOURCE\u0000"


@dataclass
class GeneralistArguments:
    output_dir: str = field(default="runs/generalist", metadata={"help": "Checkpoints, logs and the final model."})
    seed: int = field(default=42)
    vocab_size: int = field(default=4096)
    hidden_size: int = field(default=256)
    num_layers: int = field(default=4)
    num_heads: int = field(default=4)
    num_kv_heads: int = field(default=2)
    num_experts: int = field(default=32)
    top_k: int = field(default=4)
    expert_width: int = field(default=128)
    seq_len: int = field(default=256)
    batch_size: int = field(default=16)
    learning_rate: float = field(default=2e-3)
    min_lr_ratio: float = field(default=0.02, metadata={"help": "Learning rate at the end of the decay, relative."})
    warmup_steps: int = field(default=400)
    max_steps: int = field(default=10000)
    decay_steps: int = field(default=1500, metadata={"help": "Length of the final linear decay (WSD schedule)."})
    weight_decay: float = field(default=0.1)
    balance_coef: float = field(default=0.02, metadata={"help": "Per-layer load-balancing loss coefficient."})
    mono_share: float = field(default=0.2, metadata={"help": "Share of monolingual (raw text) documents."})
    log_steps: int = field(default=50)
    checkpoint_minutes: float = field(default=10.0)
    eval_steps: int = field(default=2000, metadata={"help": "Greedy dev chrF++ every N steps (0: never)."})
    eval_limit: int = field(default=48)
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (slow first step)."})
    threads: int = field(default=2)


def build_model(args: GeneralistArguments, tokenizer: PreTrainedTokenizerFast) -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,  # dense MLP width; unused since every layer is MoE
        moe_intermediate_size=args.expert_width,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        head_dim=args.hidden_size // args.num_heads,
        num_experts=args.num_experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,  # renormalised top-k: removing never-selected experts is exact
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        output_router_logits=False,
        router_aux_loss_coef=args.balance_coef,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(END_OF_TURN),
        bos_token_id=None,
    )
    torch.manual_seed(args.seed)
    model = Qwen3MoeForCausalLM(config)
    model.set_experts_implementation("grouped_mm")
    model.generation_config.eos_token_id = [
        tokenizer.convert_tokens_to_ids(END_OF_TURN),
        tokenizer.convert_tokens_to_ids(END_OF_TEXT),
    ]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def direction_weights() -> dict[str, float]:
    weights = {}
    for src in LANGUAGES:
        for tgt in LANGUAGES:
            if src == tgt:
                continue
            name = f"{src}-{tgt}"
            base = ENGLISH_CENTRIC_WEIGHT if "en" in (src, tgt) else 1.0
            weights[name] = DIRECTION_WEIGHTS.get(name, base)
    return weights


class Corpus:
    """The training split of every translation of the six languages, tokenized once into flat arrays."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, cache: Path):
        self.codes = {lang: [t.code for t in translations_for(lang)] for lang in LANGUAGES}
        all_codes = tuple(c for codes in self.codes.values() for c in codes)
        verses = load_verses(all_codes)
        self.ids = verse_ids("train", verses)
        if cache.exists():
            data = np.load(cache)
            self.tokens, self.offsets = data["tokens"], data["offsets"]
        else:
            chunks, offsets = [], [0]
            for code in all_codes:
                encoded = tokenizer([verses[code][i] for i in self.ids], add_special_tokens=False)["input_ids"]
                for ids in encoded:
                    chunks.append(np.asarray(ids, dtype=np.int16))
                    offsets.append(offsets[-1] + len(ids))
            self.tokens, self.offsets = np.concatenate(chunks), np.asarray(offsets, dtype=np.int64)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, tokens=self.tokens, offsets=self.offsets)
            os.replace(tmp, cache)
        self.row_of = {code: k for k, code in enumerate(all_codes)}
        self.n = len(self.ids)

    def verse(self, code: str, index: int) -> np.ndarray:
        k = self.row_of[code] * self.n + index
        return self.tokens[self.offsets[k] : self.offsets[k + 1]]


class MixtureSampler:
    """Builds packed rows of translation examples and monolingual documents; batch = f(seed, step)."""

    def __init__(self, corpus: Corpus, tokenizer: PreTrainedTokenizerFast, args: GeneralistArguments):
        self.corpus, self.args = corpus, args
        weights = direction_weights()
        self.directions = list(weights)
        total = sum(weights.values())
        self.direction_p = np.array([weights[d] / total for d in self.directions])
        self.newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        self.end_of_text = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
        self.end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        self.templates = {}
        for name in self.directions:
            src, tgt = name.split("-")
            probe = ParallelExample("probe", get_language(src).code, get_language(tgt).code, SOURCE_MARKER, ("x",))
            before, after = format_prompt(tokenizer, probe).split(SOURCE_MARKER)
            self.templates[name] = (
                tokenizer(before, add_special_tokens=False)["input_ids"],
                tokenizer(after, add_special_tokens=False)["input_ids"],
            )

    def translation_example(self, rng: np.random.Generator) -> list[int]:
        name = self.directions[rng.choice(len(self.directions), p=self.direction_p)]
        src, tgt = name.split("-")
        index = int(rng.integers(self.corpus.n))
        src_code = self.corpus.codes[src][rng.integers(len(self.corpus.codes[src]))]
        tgt_code = self.corpus.codes[tgt][rng.integers(len(self.corpus.codes[tgt]))]
        before, after = self.templates[name]
        return [
            *before,
            *self.corpus.verse(src_code, index).tolist(),
            *after,
            *self.corpus.verse(tgt_code, index).tolist(),
            self.end_of_turn,
        ]

    def monolingual_document(self, rng: np.random.Generator) -> list[int]:
        lang = LANGUAGES[rng.integers(len(LANGUAGES))]
        code = self.corpus.codes[lang][rng.integers(len(self.corpus.codes[lang]))]
        # 1-4 consecutive verses: about as many tokens as a translation example, so mono_share is a token share too
        count = int(rng.integers(1, 5))
        start = int(rng.integers(self.corpus.n - count))
        tokens: list[int] = []
        for index in range(start, start + count):
            if tokens:
                tokens.extend(self.newline)
            tokens.extend(self.corpus.verse(code, index).tolist())
        tokens.append(self.end_of_text)
        return tokens

    def batch(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng([self.args.seed, step])
        rows = []
        for _ in range(self.args.batch_size):
            row: list[int] = []
            while len(row) < self.args.seq_len:
                if rng.random() < self.args.mono_share:
                    row.extend(self.monolingual_document(rng))
                else:
                    row.extend(self.translation_example(rng))
            rows.append(row[: self.args.seq_len])
        return torch.tensor(rows, dtype=torch.long)


def learning_rate(args: GeneralistArguments, step: int) -> float:
    """Warmup, constant, then a linear decay over the last ``decay_steps``."""
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / args.warmup_steps
    decay_start = args.max_steps - args.decay_steps
    if step < decay_start:
        return args.learning_rate
    progress = min(1.0, (step - decay_start) / max(1, args.decay_steps))
    return args.learning_rate * (1.0 - (1.0 - args.min_lr_ratio) * progress)


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch-style load-balancing loss computed per layer (not over the concatenation of layers), and counts."""
    losses, counts = [], []
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)
        chosen = probs.topk(top_k, dim=-1).indices
        load = torch.zeros_like(probs[0]).index_add_(
            0, chosen.flatten(), torch.ones_like(chosen.flatten(), dtype=probs.dtype)
        )
        counts.append(load.detach())
        fraction = load / chosen.numel()
        losses.append(probs.shape[-1] * (fraction * probs.mean(0)).sum())
    return torch.stack(losses).mean(), torch.stack(counts)


def load_statistics(counts: torch.Tensor) -> dict:
    """Per-layer normalised entropy and smallest share relative to uniform of expert-load counts [L, E]."""
    share = counts / counts.sum(-1, keepdim=True)
    entropy = -(share * share.clamp_min(1e-12).log()).sum(-1) / math.log(counts.shape[-1])
    min_share = share.min(-1).values * counts.shape[-1]
    return {"entropy": [round(x, 4) for x in entropy.tolist()], "min_share": [round(x, 3) for x in min_share.tolist()]}


def dev_scores(model, tokenizer, limit: int) -> dict:
    scores = {}
    for direction in ("en-fr", "de-en"):
        src, tgt = direction.split("-")
        examples = bible_examples(src, tgt, "dev", limit=limit)
        hyps = translate(model, tokenizer, examples, batch_size=limit, max_new_tokens=160)
        scores[direction] = score_translations(hyps, examples)["chrf++"]
    return scores


def save_final(model, tokenizer, path: Path) -> None:
    with staging_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def main(args: GeneralistArguments) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = out / "tokenizer"
    if tokenizer_dir.exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    else:
        tokenizer = build_tokenizer(args)
        tokenizer.save_pretrained(tokenizer_dir)
    corpus = Corpus(tokenizer, out / "corpus.npz")
    sampler = MixtureSampler(corpus, tokenizer, args)
    model = build_model(args, tokenizer)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and "embed" not in name else no_decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    step, tokens_seen, elapsed = 0, 0, 0.0
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, tokens_seen, elapsed = state["step"], state["tokens_seen"], state["elapsed"]
        if step >= args.max_steps - args.decay_steps and state["args"]["max_steps"] != args.max_steps:
            raise ConfigurationError("The checkpoint is already in its final decay; it cannot be extended.")
        logger.info("resumed at step %d (%.1fM tokens, %.1f min)", step, tokens_seen / 1e6, elapsed / 60)
    logger.info("model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    forward = torch.compile(model) if args.compile else model
    model.train()
    window_loss, window_balance, window_counts, window_tokens, window_start = 0.0, 0.0, None, 0, time.time()
    last_checkpoint = time.time()
    while step < args.max_steps:
        input_ids = sampler.batch(step)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, step)
        outputs = forward(input_ids=input_ids, output_router_logits=True, use_cache=False)
        logits = outputs.logits[:, :-1].float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
        balance, counts = balance_loss(outputs.router_logits, args.top_k)
        loss = ce + args.balance_coef * balance
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        tokens_seen += input_ids.numel()
        window_tokens += input_ids.numel()
        window_loss += ce.item()
        window_balance += balance.item()
        window_counts = counts if window_counts is None else window_counts + counts
        if step % args.log_steps == 0:
            now = time.time()
            elapsed += now - window_start
            record = {
                "step": step,
                "tokens_M": round(tokens_seen / 1e6, 3),
                "minutes": round(elapsed / 60, 2),
                "lr": learning_rate(args, step - 1),
                "loss": round(window_loss / args.log_steps, 4),
                "balance_loss": round(window_balance / args.log_steps, 4),
                "tokens_per_s": round(window_tokens / (now - window_start)),
                **load_statistics(window_counts),
            }
            if args.eval_steps and step % args.eval_steps == 0:
                record["dev_chrf++"] = dev_scores(model, tokenizer, args.eval_limit)
            with open(out / "log.jsonl", "a") as log_file:
                log_file.write(json.dumps(record) + "\n")
            logger.info(json.dumps(record))
            window_loss, window_balance, window_counts, window_tokens = 0.0, 0.0, None, 0
            window_start = time.time()
            if now - last_checkpoint > 60 * args.checkpoint_minutes or step == args.max_steps:
                atomic_torch_save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "step": step,
                        "tokens_seen": tokens_seen,
                        "elapsed": elapsed,
                        "args": asdict(args),
                    },
                    checkpoint,
                )
                last_checkpoint = time.time()
    final = out / "final"
    if not final.exists():
        save_final(model, tokenizer, final)
        atomic_write_json(
            {"step": step, "tokens_seen": tokens_seen, "minutes": round(elapsed / 60, 1), "args": asdict(args)},
            final / "training_summary.json",
        )
    logger.info("done: %d steps, %.1fM tokens, %.1f min", step, tokens_seen / 1e6, elapsed / 60)


def build_tokenizer(args: GeneralistArguments) -> PreTrainedTokenizerFast:
    """BPE over the training split of every translation, plus the prompts so that they compress well."""
    codes = tuple(t.code for lang in LANGUAGES for t in translations_for(lang))
    verses = load_verses(codes)
    train_ids = verse_ids("train", verses)
    prompts = []
    for name in direction_weights():
        src, tgt = name.split("-")
        probe = ParallelExample("probe", get_language(src).code, get_language(tgt).code, "", ("x",))
        prompts.append(translation_instruction(probe) + "\n")

    def texts():
        for code in codes:
            yield from (verses[code][i] for i in train_ids)
        for _ in range(200):
            yield from prompts

    return train_tokenizer(texts(), args.vocab_size)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    (arguments,) = HfArgumentParser(GeneralistArguments).parse_args_into_dataclasses()
    main(arguments)
