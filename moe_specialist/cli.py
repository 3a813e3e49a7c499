"""``moe-specialist`` command line: thin front-ends that parse arguments and call the library.

    moe-specialist inspect   MODEL
    moe-specialist calibrate --model MODEL --calibration_directions en-fr --output stats.safetensors
    moe-specialist plan      --model MODEL --statistics_file stats.safetensors --pruning_ratio 0.5 --output plan.json
    moe-specialist prune     --model MODEL --prune_plan plan.json --output DIR
    moe-specialist evaluate  --model DIR|demo --eval_dataset_name bible --eval_directions en-fr,de-en \
                             --eval_split test --output scores.json
    moe-specialist sweep     --config RECIPE --ratios 0,0.25,0.5 [--criteria frequency,reap] [--sft_at 0.75]
    moe-specialist export    --for serving --model PRUNED_DIR --output DIR

The commands parse the recipe's dataclasses (moe_specialist.configs), so every knob has the name and the default it
has in a recipe (``--model`` is short for ``--model_name_or_path``); list-valued knobs take ``a,b`` or ``a b``.
Every command but ``inspect`` also takes ``--config FILE.yaml`` (values there are defaults that flags override).
Bad input is reported as one paragraph, ``moe-specialist <command>: error: ...``, with exit status 2; ``--debug``
(or ``MOE_SPECIALIST_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from moe_specialist.configs import (
    CalibrationArguments,
    EvalDataArguments,
    GenerationArguments,
    ModelArguments,
    PruningArguments,
    check_held_out_calibration,
)
from moe_specialist.entry import ArgumentParser, command_name, run_entry_point
from moe_specialist.errors import ConfigurationError
from moe_specialist.io import atomic_write_json, prepare_output_dir

logger = logging.getLogger("moe_specialist")


@dataclass
class RemoteCodeArguments:
    """``trust_remote_code``: in a recipe, transformers' field of ``SFTConfig``; the commands take it here."""

    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the model repository's own Python code (only for sources you trust)."}
    )


@dataclass
class PlacementArguments:
    device_map: str | None = field(
        default=None,
        metadata={
            "help": "auto: one process spreads the model over every visible GPU (then CPU memory), for a model "
            "larger than one GPU; run it without accelerate launch. Default: the process's own device."
        },
    )


@dataclass
class OutputArguments:
    output: str = field(default="", metadata={"aliases": ["--output_dir"], "help": "Where to write the result."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output."})

    def checked(self, protected: tuple[str, ...] = ()) -> Path:
        """The output path, refused before any compute when it exists, is an input, or cannot be written."""
        if not self.output:
            raise ConfigurationError("--output is required: say where to write the result.")
        path = prepare_output_dir(self.output, self.overwrite, protected=protected)
        check_writable(path.parent)
        return path


def check_writable(directory: Path) -> None:
    """Fail now rather than after the compute: create ``directory`` and a file in it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise ConfigurationError(
            f"Cannot write to {directory} ({error.strerror or error}): choose an output in a writable directory."
        ) from None


@dataclass
class PruneModeArguments:
    mode: str = field(
        default="auto",
        metadata={
            "help": "disk: rewrite safetensors shard by shard (no model in memory); memory: load, prune, save; "
            "auto: disk for local checkpoints without compensation, else memory."
        },
    )


@dataclass
class ExportArguments:
    target: str = field(
        default="",
        metadata={
            "aliases": ["--for"],
            "help": "serving: pad a non-uniform pruned checkpoint to one expert count per layer (vLLM, SGLang).",
        },
    )


@dataclass
class InspectArguments:
    json: bool = field(default=False, metadata={"help": "Print the description as JSON."})


def _parse(command: str, types, argv):
    """``(model_args, remote_code_args, *instances of types)``: every command names a model first."""
    return ArgumentParser((ModelArguments, RemoteCodeArguments, *types), prog=command_name(command)).parse(argv)


def cmd_inspect(argv: list[str]) -> None:
    from moe_specialist.models import load_config
    from moe_specialist.prune import structure_from_config

    if argv and not argv[0].startswith("-"):  # MODEL may come first, as a positional argument
        argv = ["--model", argv[0], *argv[1:]]
    model_args, remote, inspect_args = _parse("inspect", (InspectArguments,), argv)
    config = load_config(model_args.model_name_or_path, model_args.model_revision, remote.trust_remote_code)
    report = describe(structure_from_config(config))
    print(
        json.dumps(report, indent=2)
        if inspect_args.json
        else format_description(model_args.model_name_or_path, report)
    )


def describe(moe) -> dict:
    from moe_specialist.architectures import stored_field_name, text_config

    config = text_config(moe.model.config)
    return {
        "architecture": moe.architecture,
        "model_type": moe.model_type,
        "moe_layers": moe.layer_indices,
        "experts_per_layer": {str(k): v for k, v in moe.experts_per_layer.items()},
        "top_k": moe.top_k,
        "count_fields": sorted({stored_field_name(config, name) for name in moe.count_fields}),
        "count_aliases": sorted(name for name in moe.count_fields if stored_field_name(config, name) != name),
        "top_k_field": moe.top_k_field,
        "n_group": moe.n_group,
        "routing": {"kind": moe.routing.kind, "exact": moe.routing.exact, "reason": moe.routing.reason},
        "shared_experts": bool(moe.layers[0].shared_expert_paths),
        "parameters": moe.parameter_counts(),
        "block": moe.layers[0].block_path.replace(str(moe.layers[0].layer_index), "{i}", 1),
    }


def format_description(name: str, report: dict) -> str:
    params = report["parameters"]
    counts = sorted(set(report["experts_per_layer"].values()))
    per_layer = counts[0] if len(counts) == 1 else report["experts_per_layer"]
    shared = "yes" if report["shared_experts"] else "no"
    exact = {True: "yes", False: "no", None: "only under conditions"}[report["routing"]["exact"]]
    millions = {k: f"{v / 1e6:,.2f}M" for k, v in params.items()}
    return "\n".join(
        [
            f"{name}: {report['architecture']} ({report['model_type']})",
            f"  MoE layers       {len(report['moe_layers'])}: {report['moe_layers']} ({report['block']})",
            f"  experts/layer    {per_layer}, top-k {report['top_k']}, groups {report['n_group']}, "
            f"shared experts: {shared}",
            f"  config fields    expert count {', '.join(report['count_fields'])} (aliases: "
            f"{', '.join(report['count_aliases']) or 'none'}), top-k {report['top_k_field']}",
            f"  routing          {report['routing']['kind']}; exact under pruning: {exact}",
            f"                   ({report['routing']['reason']})",
            f"  parameters       {millions['total']} total = {millions['routed_experts']} in routed experts + "
            f"{millions['other']} other; {millions['active']} active per token",
        ]
    )


def cmd_calibrate(argv: list[str]) -> None:
    from moe_specialist.calibrate import statistics_for
    from moe_specialist.models import load_from_arguments, local_model_dirs

    model_args, remote, calibration, placement, output = _parse(
        "calibrate", (CalibrationArguments, PlacementArguments, OutputArguments), argv
    )
    path = output.checked(protected=local_model_dirs(model_args.model_name_or_path))
    if path.suffix != ".safetensors":
        raise ConfigurationError(
            f"--output {path} must end in .safetensors (a readable .json summary is written next to it)."
        )
    calibration.calibration_selection.check_access()
    state = _distributed_state()
    if placement.device_map is None:
        model, tokenizer = load_from_arguments(model_args, remote.trust_remote_code, device=state.device)
    elif placement.device_map != "auto" or state.num_processes > 1:
        raise ConfigurationError(
            f"--device_map {placement.device_map} in {state.num_processes} process(es): --device_map auto spreads "
            "one process's model over every GPU; run it without accelerate launch, or drop it to shard the data "
            "over the launched processes instead."
        )
    else:
        model, tokenizer = load_from_arguments(model_args, remote.trust_remote_code, device_map="auto")
    stats = statistics_for(  # the output was checked above: with --overwrite, calibrate again
        model,
        tokenizer,
        calibration,
        model_args.model_name_or_path,
        statistics_file=str(path),
        progress=state.is_main_process,
        reuse=False,
    )
    if state.is_main_process:
        tokens = {g: sum(v.values()) for g, v in stats.token_table().items()}
        print(f"wrote {path}: groups {stats.groups}, tokens {tokens}, {len(stats.layers)} MoE layers")


def _distributed_state():
    from accelerate import PartialState

    return PartialState()


def cmd_plan(argv: list[str]) -> None:
    from moe_specialist.models import load_config
    from moe_specialist.plan import plan_for
    from moe_specialist.prune import structure_from_config
    from moe_specialist.stats import RoutingStats

    model_args, remote, pruning, output = _parse("plan", (PruningArguments, OutputArguments), argv)
    if pruning.compensation != "none":
        raise ConfigurationError(
            f"--compensation {pruning.compensation} changes the pruned model's weights, not which experts it keeps, "
            "so a plan does not hold it: plan without it, then pass it to `moe-specialist prune --compensation "
            f"{pruning.compensation}` (or to the sweep or `moe_specialist.train`)."
        )
    path = output.checked()
    stats = RoutingStats.load(pruning.statistics_file) if pruning.statistics_file else None
    name = model_args.model_name_or_path
    moe = structure_from_config(load_config(name, model_args.model_revision, remote.trust_remote_code))
    # the model is on the meta device: the statistics are checked against the routers in the checkpoint's files
    plan = plan_for(moe, stats, pruning, checkpoint=local_checkpoint(name, model_args.model_revision))
    plan.save(path)
    kept = [len(ids) for ids in plan.kept_experts.values()]
    print(f"wrote {path}: {plan.metadata.get('actual_ratio')} of experts removed, kept per layer {kept}")


def local_checkpoint(name: str, revision: str | None) -> str | None:
    """The local directory of a model (the Hub cache for a Hub id, without downloading), or None."""
    from moe_specialist.models import resolve_model_path

    path = resolve_model_path(name)
    if Path(path).is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, revision=revision, local_files_only=True)
    except Exception:  # not cached: huggingface_hub raises several types
        return None


def cmd_prune(argv: list[str]) -> None:
    from moe_specialist.model_card import pruned_model_card, summarize_moe
    from moe_specialist.models import download_checkpoint, load_from_arguments, local_model_dirs, resolve_model_path
    from moe_specialist.plan import PLAN_FILE, PrunePlan
    from moe_specialist.prune import prune_checkpoint, save_pruned_model

    model_args, remote, pruning, calibration, inputs, output = _parse(
        "prune", (PruningArguments, CalibrationArguments, PruneModeArguments, OutputArguments), argv
    )
    if inputs.mode not in ("disk", "memory", "auto"):
        raise ConfigurationError(f"--mode must be disk, memory or auto, not {inputs.mode!r}.")
    compensated = pruning.compensation != "none"
    if compensated and inputs.mode == "disk":
        raise ConfigurationError(
            f"--compensation {pruning.compensation} re-fits the kept experts against the unpruned model in memory, "
            "which --mode disk never loads: use --mode memory (or auto), or --compensation none."
        )
    if not pruning.prune_plan:
        raise ConfigurationError("--prune_plan is required: a prune plan JSON from `moe-specialist plan`.")
    check_held_out_calibration(calibration, pruning.sensitivity_examples, [pruning.compensation])
    plan = PrunePlan.load(pruning.prune_plan)
    source = resolve_model_path(model_args.model_name_or_path)
    local = Path(source).is_dir()
    path = output.checked(protected=local_model_dirs(source))
    mode = inputs.mode if inputs.mode != "auto" else ("disk" if local and not compensated else "memory")
    if mode == "disk":
        if not local:
            source = download_checkpoint(source, model_args.model_revision)
        prune_checkpoint(source, plan, path, overwrite=output.overwrite, source_name=model_args.model_name_or_path)
    else:
        from moe_specialist.architectures import find_moe
        from moe_specialist.compensation import COMPENSATION_FILE, named_compensation, prune_and_compensate

        model, tokenizer = load_from_arguments(model_args, remote.trust_remote_code, source)
        moe = find_moe(model)
        summary_before = summarize_moe(moe)
        compensation = named_compensation(pruning.compensation, tokenizer, calibration, pruning)
        _, trace = prune_and_compensate(model, plan, moe, compensation)
        extra_files = {PLAN_FILE: json.dumps(plan.to_dict(), indent=2)}
        if trace is not None:
            extra_files[COMPENSATION_FILE] = json.dumps(trace, indent=2)
        card = pruned_model_card(model_args.model_name_or_path, plan, summary_before, summarize_moe(moe), moe.routing)
        save_pruned_model(
            model,
            path,
            tokenizer,
            overwrite=output.overwrite,
            extra_files={"README.md": card, **extra_files},
            protected=local_model_dirs(source),
        )
    print(f"wrote {path} ({mode}): kept per layer {[len(v) for v in plan.kept_experts.values()]}")


def cmd_evaluate(argv: list[str]) -> None:
    from moe_specialist.evaluate import evaluate_translations, summary_line
    from moe_specialist.models import load_from_arguments, local_model_dirs

    model_args, remote, evaluation, generation, output = _parse(
        "evaluate", (EvalDataArguments, GenerationArguments, OutputArguments), argv
    )
    path = output.checked(protected=local_model_dirs(model_args.model_name_or_path)) if output.output else None
    examples = evaluation.eval_selection.load()
    model, tokenizer = load_from_arguments(model_args, remote.trust_remote_code, device=_distributed_state().device)
    result = evaluate_translations(model, tokenizer, examples, **generation.decoding_kwargs)
    result = {
        "model": model_args.model_name_or_path,
        "eval_dataset_name": evaluation.eval_dataset_name,
        "eval_split": evaluation.eval_split,
        "max_eval_examples": evaluation.max_eval_examples,
        "dtype": model_args.dtype,
        **result,
    }
    if path:
        atomic_write_json(result, path)
    print(summary_line(result))


def cmd_export(argv: list[str]) -> None:
    from moe_specialist.export import REPORT_FILE, export_for_serving
    from moe_specialist.models import resolve_model_path

    model_args, _, export, output = _parse("export", (ExportArguments, OutputArguments), argv)
    if export.target != "serving":
        raise ConfigurationError(
            f"--for must be serving (one expert count per layer, for vLLM and SGLang), not {export.target!r}."
        )
    source = resolve_model_path(model_args.model_name_or_path)
    if not Path(source).is_dir():
        raise ConfigurationError(
            f"export reads a pruned checkpoint directory; {source} is not one (download it first, e.g. `hf download "
            f"{source} --local-dir DIR`)."
        )
    path = output.checked(protected=(source,))
    cost = export_for_serving(source, path, overwrite=output.overwrite, dtype=model_args.dtype)
    print(f"wrote {path}: {cost.summary()}; report in {path / REPORT_FILE}")


def cmd_sweep(argv: list[str]) -> None:
    from moe_specialist.sweep import run_sweep_cli

    run_sweep_cli(argv)


COMMANDS = {
    "inspect": cmd_inspect,
    "calibrate": cmd_calibrate,
    "plan": cmd_plan,
    "prune": cmd_prune,
    "evaluate": cmd_evaluate,
    "sweep": cmd_sweep,
    "export": cmd_export,
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    if argv[0] not in COMMANDS:
        print(
            f"moe-specialist: error: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)} (see "
            "`moe-specialist --help`).",
            file=sys.stderr,
        )
        raise SystemExit(2)
    run_entry_point(argv[0], COMMANDS[argv[0]], argv[1:])


if __name__ == "__main__":
    main()
