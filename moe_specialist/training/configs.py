"""Recipe dataclasses: what one prune(+SFT) run reads from its YAML recipe and the command line.

A recipe is flat YAML parsed by TRL's ``TrlParser`` into, in this order (:data:`RECIPE_TYPES`):

1. :class:`~moe_specialist.configs.ModelArguments` (``trl.ModelConfig``): ``model_name_or_path`` (a Hub id, a local
   directory or ``demo``), ``dtype``, ``use_peft`` and the ``lora_*`` fields;
2. :class:`DataArguments`: SFT data, plus the evaluated data of
   :class:`~moe_specialist.configs.EvalDataArguments`;
3. :class:`~moe_specialist.configs.CalibrationArguments`: routing statistics;
4. :class:`~moe_specialist.configs.PruningArguments`: criterion, allocation, ratio, statistics file, plan to replay;
5. :class:`SFTConfig`: ``trl.SFTConfig`` plus the callbacks, W&B identity, the decoding of
   :class:`~moe_specialist.configs.GenerationArguments` and the trainable-set knobs.

The ``moe-specialist`` commands parse the same dataclasses (``evaluate`` takes ``EvalDataArguments`` and
``GenerationArguments``), so a knob has one name and one default everywhere. Precedence is dataclass default < YAML
< command-line flag; unknown YAML keys fail; an ``env:`` mapping in the YAML is exported before parsing. Everything a
sweep varies (``pruning_ratio``, ``pruning_criterion``, ``learning_rate``, ``seed``...) is a top-level value, so a
recipe key, a CLI flag and a W&B sweep parameter are the same name.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field

import torch
import trl

from moe_specialist.configs import (
    DEFAULT_DATASET,
    DEFAULT_DIRECTIONS,
    TARGET_FILES_HELP,
    CalibrationArguments,
    EvalDataArguments,
    GenerationArguments,
    ModelArguments,
    PruningArguments,
    check_field_types,
    check_minimum,
    normalize_lists,
)
from moe_specialist.errors import ConfigurationError
from moe_specialist.training.recovery import RECOVERY_MODES, uses_teacher

DEFAULT_CALLBACKS = ["expert_pruning", "translation_eval"]


@dataclass
class DataArguments(EvalDataArguments):
    """SFT data (never a test set), plus the translations scored during training (dev data, inherited fields)."""

    dataset_name: str = field(
        default=DEFAULT_DATASET,
        metadata={
            "help": "SFT data: bible or a local TSV/JSONL file or glob. Test sets (flores_plus, wmt24pp) refused."
        },
    )
    train_directions: list[str] = field(
        default_factory=lambda: list(DEFAULT_DIRECTIONS),
        metadata={"help": "Directions, e.g. en-de en-ja (or en-de,en-ja)."},
    )
    train_split: str = field(default="train")
    dataset_target_files: list[str] | None = field(default=None, metadata={"help": TARGET_FILES_HELP})
    max_train_examples: int | None = field(
        default=None, metadata={"help": "Examples per direction (a seeded sample)."}
    )

    def __post_init__(self):
        from moe_specialist.data.sources import check_target_files, check_trainable, selections_overlap

        normalize_lists(self)
        check_field_types(self)
        check_trainable(self.dataset_name)
        if not self.train_directions:
            raise ConfigurationError("train_directions is empty: give at least one direction such as en-fr.")
        self.eval_dataset_name = self.eval_dataset_name or self.dataset_name
        self.eval_directions = self.eval_directions or self.train_directions
        super().__post_init__()  # the evaluated data's own checks
        check_target_files(self.dataset_name, self.dataset_target_files, "dataset_target_files")
        trained, evaluated = self.train_selection, self.eval_selection
        if selections_overlap(trained, evaluated):
            fix = (
                "other files (eval_dataset_name, eval_target_files)"
                if trained.local
                else "another split (eval_split: dev) or another source (eval_dataset_name)"
            )
            raise ConfigurationError(
                f"The eval data ({evaluated}) overlaps the SFT data ({trained}): evaluate on {fix}."
            )
        check_minimum(self, 1, "max_train_examples")

    @property
    def train_selection(self):
        """The SFT examples: a seeded sample per direction, the same on every rank."""
        from moe_specialist.data.sources import DataSelection

        return DataSelection(
            self.dataset_name,
            self.train_split,
            self.dataset_target_files,
            self.train_directions,
            self.max_train_examples,
            self.dataset_seed,
        )


PRUNE_MODES = ("memory", "disk")


@dataclass
class SFTConfig(trl.SFTConfig, GenerationArguments):
    """``trl.SFTConfig`` plus the pipeline's knobs (open-r1 style: every field is a recipe key and a CLI flag).

    The decoding knobs of every score (``max_new_tokens``, ``generation_batch_size``, ``no_repeat_ngram_size``) are
    those of :class:`~moe_specialist.configs.GenerationArguments`, shared with ``moe-specialist evaluate``.
    """

    # Where the experts are removed (moe_specialist.training.on_disk)
    prune_mode: str = field(
        default="memory",
        metadata={
            "help": "memory (every rank loads the whole model and prunes it in on_init_end) | disk (plan with the "
            "unpruned model on each rank's device, rank 0 prunes the checkpoint on disk once into "
            "output_dir/pruned_source, every rank loads only that; ZeRO-3 partitions it while it loads)."
        },
    )
    check_memory: bool = field(
        default=True,
        metadata={"help": "Estimate host and GPU memory per rank before loading and refuse a run that cannot fit."},
    )

    # Which callbacks the run uses (registry names, see moe_specialist.training.callbacks.CALLBACKS)
    callbacks: list[str] = field(
        default_factory=lambda: list(DEFAULT_CALLBACKS),
        metadata={"help": "Registry names: expert_pruning (prune at on_init_end), translation_eval (chrF++/BLEU)."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow an existing non-empty output_dir (its final model is replaced)."}
    )
    use_cpu: bool | None = field(
        default=None,
        metadata={
            "help": "Run on CPU. Default: true when no GPU is visible and DeepSpeed is not in use (DDP on CPU needs "
            "it; DeepSpeed on CPU needs it false, or accelerate silently drops DeepSpeed). Without a GPU, a "
            "distributed launch's ddp_backend defaults to gloo."
        },
    )

    # Weights & Biases run identity (a rank-0 wandb.init before the Trainer; see training/wandb_logging.py)
    wandb_entity: str | None = field(default=None, metadata={"help": "W&B entity (team or user)."})
    wandb_project: str = field(default="moe-specialist", metadata={"help": "W&B project."})
    wandb_run_group: str | None = field(default=None, metadata={"help": "W&B group, e.g. one per sweep."})
    wandb_job_type: str = field(default="prune_sft", metadata={"help": "W&B job type."})
    wandb_tags: list[str] | None = field(default=None, metadata={"help": "W&B tags."})

    # Translation evaluation during training (TranslationEvalCallback; its decoding: GenerationArguments)
    mt_eval_num_samples_table: int = field(
        default=8, metadata={"help": "Rows per direction in the W&B table of sample translations (0 = none)."}
    )
    mt_eval_on_start: bool = field(
        default=True, metadata={"help": "Score before the first step (the prune-only score)."}
    )

    # What is trained
    train_router_only: bool = field(
        default=False, metadata={"help": "Train the routers only (everything else frozen)."}
    )
    freeze_router: bool = field(default=False, metadata={"help": "Keep the routers fixed (train everything else)."})

    # Recovery: what the pruned student learns from (moe_specialist.training.recovery, training/teacher.py)
    recovery: str = field(
        default="sft",
        metadata={
            "help": "sft (cross-entropy on the references) | kd (distillation from the unpruned model) | kd+ce "
            "(kd_alpha x KD + (1 - kd_alpha) x CE) | router_kd (routers only, KD on every token of the pairs)."
        },
    )
    kd_alpha: float = field(default=0.5, metadata={"help": "kd+ce: the weight of the KD term, in [0, 1]."})
    kd_beta: float = field(
        default=0.0,
        metadata={"help": "Generalized JSD interpolation (GKD): 0 = forward KL(teacher||student), 0.5 = JSD, 1 = "
                  "reverse KL. Precomputed teacher logits support 0 only."},
    )  # fmt: skip
    kd_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of both distributions (> 0)."})
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The teacher (same tokenizer). Default: the model being pruned, copied before pruning."},
    )
    teacher_logits: str | None = field(
        default=None,
        metadata={
            "help": "A directory of precomputed top-k teacher logits for the SFT data: computed there once when "
            "missing (the teacher is held only for that pass), reused by later runs. Default: a live teacher."
        },
    )
    teacher_top_k: int = field(default=32, metadata={"help": "Teacher logits kept per position (precomputed)."})
    progressive_ratios: list[float] | None = field(
        default=None,
        metadata={
            "help": "Prune in stages: these shares of the experts first (increasing, below pruning_ratio), "
            "recovering between stages; max_steps is split evenly (moe_specialist.training.progressive)."
        },
    )

    def __post_init__(self):
        own = inspect.get_annotations(SFTConfig)
        normalize_lists(self, own)
        check_field_types(self, own)  # the fields of trl.SFTConfig are transformers' and TRL's to check
        GenerationArguments.__post_init__(self)
        if self.push_to_hub:
            raise ConfigurationError(
                "push_to_hub is not supported: the Trainer would push output_dir (its checkpoints), not the pruned "
                "model the run saves in output_dir/model. Push that after the run, e.g. "
                "`hf upload <repo id> <output_dir>/model`."
            )
        if not _accelerator_visible() and _fsdp_launch():
            raise ConfigurationError(
                "An FSDP launch without a GPU: accelerate runs FSDP on GPUs only and would silently fall back to "
                "DDP. On CPU use accelerate_configs/cpu/zero3.yaml (DeepSpeed ZeRO-3 shards the same way)."
            )
        if not _accelerator_visible():
            if self.use_cpu is None:
                self.use_cpu = not _deepspeed_launch()
            if self.ddp_backend is None and _distributed_launch():
                self.ddp_backend = "gloo"  # DeepSpeed on CPU: without a backend accelerate sees one process per rank
        self.use_cpu = bool(self.use_cpu)
        if self.use_cpu and _deepspeed_launch():
            raise ConfigurationError(
                "use_cpu=true under a DeepSpeed launch: accelerate would silently run without DeepSpeed. DeepSpeed "
                "runs on CPU by itself: leave use_cpu unset (or false) with accelerate_configs/cpu/zero*.yaml."
            )
        super().__post_init__()
        from moe_specialist.training.callbacks import check_callback_names

        check_callback_names(self.callbacks)
        if self.train_router_only and self.freeze_router:
            raise ConfigurationError("train_router_only and freeze_router contradict each other: choose one.")
        self.check_recovery()
        if self.prune_mode not in PRUNE_MODES:
            raise ConfigurationError(f"prune_mode must be one of {', '.join(PRUNE_MODES)}, got {self.prune_mode!r}.")
        if self.prune_mode == "disk" and "expert_pruning" not in self.callbacks:
            raise ConfigurationError(
                "prune_mode disk prunes the checkpoint with the run's plan, but `callbacks` has no expert_pruning: "
                "add it, or drop prune_mode to train the model as it is."
            )
        check_minimum(self, 0, "mt_eval_num_samples_table")
        if self.max_steps < -1:
            raise ConfigurationError(
                f"max_steps must be -1 (use num_train_epochs), 0 (prune only) or positive, got {self.max_steps}."
            )

    def check_recovery(self) -> None:
        """The recovery knobs agree with each other; ``router_kd`` trains the routers on every token."""
        if self.recovery not in RECOVERY_MODES:
            raise ConfigurationError(f"recovery must be one of {', '.join(RECOVERY_MODES)}, got {self.recovery!r}.")
        for name in ("kd_alpha", "kd_beta"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigurationError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.kd_temperature <= 0:
            raise ConfigurationError(f"kd_temperature must be positive, got {self.kd_temperature}.")
        check_minimum(self, 1, "teacher_top_k")
        if self.teacher_logits and self.kd_beta != 0:
            raise ConfigurationError(
                f"kd_beta {self.kd_beta} needs the teacher's whole distribution; precomputed teacher_logits hold its "
                "top-k only (forward KL): set kd_beta: 0, or drop teacher_logits for a live teacher."
            )
        if self.recovery == "router_kd":
            if self.freeze_router:
                raise ConfigurationError("recovery router_kd trains the routers: drop freeze_router.")
            if self.completion_only_loss:
                raise ConfigurationError(
                    "recovery router_kd distils on every token of the pairs: drop completion_only_loss."
                )
            self.train_router_only = True
            self.completion_only_loss = False
        if uses_teacher(self.recovery) and self.packing:
            raise ConfigurationError(f"recovery {self.recovery} does not support packing: set packing: false.")

    @property
    def uses_teacher(self) -> bool:
        return uses_teacher(self.recovery)

    @property
    def prune_only(self) -> bool:
        """``max_steps: 0`` (or ``num_train_epochs: 0``): prune, evaluate and save without any SFT step."""
        return self.max_steps == 0 or (self.max_steps < 0 and self.num_train_epochs == 0)


def _accelerator_visible() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu and xpu.is_available()) or torch.backends.mps.is_available()


def _distributed_launch() -> bool:
    return int(os.environ.get("LOCAL_RANK", -1)) != -1


def _deepspeed_launch() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def _fsdp_launch() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


RECIPE_TYPES = (ModelArguments, DataArguments, CalibrationArguments, PruningArguments, SFTConfig)


def make_parser():
    """The recipe parser: ``make_parser().parse(argv)`` returns one instance of each of RECIPE_TYPES; bad input is
    an expected error (see :mod:`moe_specialist.entry`)."""
    from moe_specialist.entry import ArgumentParser, command_name

    return ArgumentParser(RECIPE_TYPES, prog=command_name("train"))
