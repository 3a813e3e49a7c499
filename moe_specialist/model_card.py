"""README.md model cards for pruned checkpoints: what was removed, from what, how, and how to load it."""

from __future__ import annotations

from moe_specialist import __version__
from moe_specialist.architectures import MoEModel
from moe_specialist.plan import PrunePlan


def summarize_moe(moe: MoEModel) -> dict:
    """Experts per layer, parameter counts and top-k: the ``before``/``after`` of a model card and of results."""
    return {
        "experts_per_layer": {str(k): v for k, v in moe.experts_per_layer.items()},
        "parameters": moe.parameter_counts(),
        "top_k": moe.top_k,
    }


def _millions(n: int) -> str:
    return f"{n / 1e6:,.2f}M"


def pruned_model_card(source: str, plan: PrunePlan, before: dict, after: dict, routing) -> str:
    """Markdown card; ``before`` and ``after`` hold ``experts_per_layer``, ``parameters`` and ``top_k``."""
    meta = plan.metadata
    per_layer = after["experts_per_layer"]
    uniform = len(set(per_layer.values())) == 1
    kept = ", ".join(f"{k}: {v}" for k, v in sorted(per_layer.items(), key=lambda kv: int(kv[0])))
    lines = [
        "---",
        "library_name: transformers",
        "tags: [moe-specialist, expert-pruning, translation]",
        f"base_model: {source}",
        "---",
        "",
        f"# {source}, expert-pruned",
        "",
        f"Made with moe-specialist {__version__}: routed experts removed physically (expert weights, router rows and "
        "every per-expert tensor); shared experts and dense layers untouched.",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| routed experts | {sum(before['experts_per_layer'].values())} | {sum(per_layer.values())} |",
        f"| parameters | {_millions(before['parameters']['total'])} | {_millions(after['parameters']['total'])} |",
        f"| parameters in routed experts | {_millions(before['parameters']['routed_experts'])} | "
        f"{_millions(after['parameters']['routed_experts'])} |",
        f"| active parameters per token | {_millions(before['parameters']['active'])} | "
        f"{_millions(after['parameters']['active'])} |",
        f"| top-k | {before['top_k']} | {after['top_k']} |",
        "",
        f"- Pruning ratio: {meta.get('actual_ratio', 'n/a')} of routed experts "
        f"(target {meta.get('target_ratio', 'n/a')}).",
        f"- Criterion: `{meta.get('criterion', 'hand-written plan')}`; allocation: `{meta.get('allocation', 'n/a')}`; "
        f"selection: `{meta.get('selection', 'n/a')}`; statistics groups: {meta.get('groups') or 'all'}; "
        f"roles: {meta.get('roles') or 'source + target'}.",
        f"- Routing: `{routing.kind}`, exact under pruning: {routing.exact} ({routing.reason}).",
        f"- Experts kept per MoE layer: {kept}.",
        "- The kept expert ids are in `prune_plan.json`, which replays on the same or a sibling checkpoint.",
        "",
        "## Loading",
        "",
    ]
    if uniform:
        lines += [
            "Every MoE layer keeps the same number of experts: plain transformers loads it.",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/model")',
            "```",
        ]
    else:
        lines += [
            "MoE layers keep different numbers of experts (config key `moe_experts_per_layer`). transformers loads "
            "it with the modeling file that comes with it (`modeling_moe_specialist.py`, which imports only torch and "
            "transformers):",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/model", trust_remote_code=True)',
            "```",
            "",
            "or, without remote code, with moe-specialist: `moe_specialist.prune.load_pruned_model(path)`. Serving "
            "engines that need one expert count per model take `moe-specialist export --for serving`'s output.",
        ]
    return "\n".join(lines) + "\n"
