"""How much host and GPU memory each rank of a run needs, phase by phase, from the model's config alone.

The parameter counts are exact: they come from the model built on the meta device (:func:`structure_from_config`,
before pruning and with the pruned expert counts, which is also how a pruned checkpoint is loaded), so they equal the
bytes of the materialized model, before and after :func:`~moe_specialist.prune.prune_model`. Everything else is a
stated model of the runtime, meant to tell a run that cannot fit from one that can, not to predict the last GiB:

- weights: ``dtype_bytes`` per parameter (bf16: 2). Buffers (rotary tables, score-correction biases) are left out.
- optimizer (AdamW) and gradients under DeepSpeed, as DeepSpeed's own estimators count them
  (``estimate_zero2/3_model_states_mem_needs``): per trainable parameter an fp32 master copy, ``exp_avg`` and
  ``exp_avg_sq`` (12 bytes) and an fp32 gradient (4 bytes), partitioned over the ranks, plus under ZeRO-2 the bf16
  gradients (2 bytes, partitioned); without DeepSpeed (DDP, or one process) the AdamW moments take the parameters'
  dtype (2 x the weight bytes, no master copy) and the gradients are whole on every rank, twice over with more
  than one process (the gradients and DDP's all-reduce buckets).
- LoRA adapters: counted by PEFT itself on the meta model; PEFT keeps them in fp32 (4 bytes) unless DeepSpeed casts
  the module to the training dtype.
- ZeRO-3 gathers two units at a time (the one running and the one prefetched: DeepSpeed's own ``4 x largest layer``
  bytes); a unit is a decoder layer (the sparse MoE blocks are ZeRO-3 leaf modules, gathered whole) or a tensor
  outside the layers (embedding, LM head).
- activations, per token of ``per_device_train_batch_size x max_length``: one layer's working set is
  ``ACTIVATION_HIDDEN_MULTIPLE x hidden + top_k x expert width`` values (residual stream copies, norms, q/k/v/o,
  router logits, the MoE gather/scatter buffers; an expert's width is its parameters per hidden unit, 3 x its
  intermediate size for gate, up and their product), plus eager attention's ``batch x heads x seq^2`` scores in the
  dtype and fp32. With gradient checkpointing every layer keeps its input (``layers x tokens x hidden``) and one layer
  is recomputed with its gradients (2 working sets); without it every layer keeps its working set. The logits cost
  ``LOGIT_BYTES_TRAIN`` per token and vocabulary entry (bf16 logits, fp32 log-softmax and its gradient), a live
  teacher's ``LOGIT_BYTES_INFER`` more. Shared experts, dense MLPs and latent attention get no term of their own:
  without checkpointing the estimate is 0.79-1.15 x what autograd saves for the backward pass on Qwen3-MoE,
  GPT-OSS (eager), OLMoE and DeepSeek-V3 (tests/test_memory.py).
- measure (calibration, sensitivity, teacher logits): a forward pass of the unpruned model without gradients over
  ``measure_batch_size x measure_max_length`` tokens: one working set and the logits (``LOGIT_BYTES_INFER``).
- eval (translation generation): on top of the training state (the optimizer state stays allocated between steps)
  and a live teacher, a KV cache of ``generation_batch_size x (max_length + max_new_tokens)`` positions in every layer
  (prompts bounded by ``max_length``, sliding windows not shortened: an upper bound), one prefill working set and
  last-position fp32 logits.
- a live teacher: the unpruned model on the GPUs (partitioned like the student under ZeRO-3) and its logits; today
  it is first a copy in host memory, made before pruning. Precomputed teacher logits cost nothing beyond measuring.
- host staging: the largest tensor as held in memory (fused experts: an upper bound of a checkpoint's per-expert
  tensors); a checkpoint shard is ``shard_bytes`` (default ``DEFAULT_SHARD_BYTES``) or the pruned model if smaller.
- every process: ``HOST_RUNTIME_BYTES`` of host memory (Python, torch, the CUDA libraries, tokenizer and data) and
  ``GPU_RUNTIME_BYTES`` of GPU memory (CUDA context, NCCL and cuBLAS buffers, allocator slack).

Two ways to load and prune (``prune_mode``):

- ``memory``: every rank loads the unpruned model in host memory, measures it on its GPU, prunes it there, and
  DeepSpeed partitions (ZeRO-3) or replicates it.
- ``disk``: every rank measures the unpruned model loaded straight to its GPU (host: one tensor at a time),
  rank 0 prunes the checkpoint on disk with a streaming writer (host: the largest tensor + ``STREAM_WRITER_SLACK``),
  then every rank loads only the pruned model, partitioned at load time under ZeRO-3 (host: one checkpoint shard).

In both, the translation eval generates on the partitioned weights under ZeRO-3, two units gathered at a time.

:func:`estimate_memory` builds a :class:`MemoryEstimate` (``describe()`` renders it for logs);
:func:`check_memory_fits` refuses a run whose phase does not fit, naming the knob to turn; :func:`available_memory`
reads what a rank has; :func:`estimate_for_run` takes a recipe's ``SFTConfig``.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe_specialist.architectures import LAYER_INDEX, MoEModel, text_config
from moe_specialist.errors import ConfigurationError
from moe_specialist.prune import structure_from_config, update_config

GIB = 1024**3
PRUNE_MODES = ("memory", "disk")
TRAINING_MODES = ("full", "lora", "router_only", "prune_only")
TEACHERS = ("none", "live", "precomputed")

ADAM_DEEPSPEED_BYTES = 12  # fp32 master + exp_avg + exp_avg_sq per trainable parameter
FP32_GRADIENT_BYTES = 4  # DeepSpeed's fp32 gradient partition, next to the optimizer state
ADAPTER_BYTES = 4  # PEFT upcasts LoRA adapters of a bf16/fp16 model to fp32 (autocast_adapter_dtype)
ZERO3_GATHERED_UNITS = 2  # the unit running and the one prefetched
ACTIVATION_HIDDEN_MULTIPLE = 16
LOGIT_BYTES_TRAIN = 12
LOGIT_BYTES_INFER = 6
EVAL_LOGIT_BYTES = 4  # generation keeps the last position's logits, in fp32
HOST_RUNTIME_BYTES = 3 * GIB
GPU_RUNTIME_BYTES = 3 * GIB // 2
STREAM_WRITER_SLACK = 200 * 1000**2
# The shard size transformers 4 wrote the Hub checkpoints of these models with; a pruned checkpoint keeps its source's
# shards, each smaller.
DEFAULT_SHARD_BYTES = 5 * 1000**3
MEMINFO = Path("/proc/meminfo")


# ---- parameter counts -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSize:
    """Parameter counts of one model (unpruned, or as a plan leaves it), from its structure on the meta device."""

    total: int
    routed_experts: int  # in the experts modules (every routed expert's weights and biases)
    router: int  # in the routers
    largest_tensor: int
    largest_unit: int  # a decoder layer, or a tensor outside the layers: what ZeRO-3 gathers at once
    largest_experts: int  # the routed experts of the MoE layer that keeps the most
    experts_per_layer: dict[int, int]
    lora: int = 0  # adapter parameters, when counted with a PEFT config

    @property
    def other(self) -> int:
        """Everything outside the routed experts (attention, routers, shared experts, dense MLPs, embeddings)."""
        return self.total - self.routed_experts


def model_size(moe: MoEModel, peft_config=None) -> ModelSize:
    """The counts of a (meta-device) model; ``peft_config`` adds the adapters PEFT would add to it (this wraps it)."""
    counts = moe.parameter_counts()
    units: dict[str, int] = {}
    largest = 0
    for name, parameter in moe.model.named_parameters():
        match = LAYER_INDEX.search(name)
        key = f"layer {match.group(1)}" if match else name
        units[key] = units.get(key, 0) + parameter.numel()
        largest = max(largest, parameter.numel())
    lora = 0
    if peft_config is not None:
        from peft import get_peft_model

        with torch.device("meta"):
            wrapped = get_peft_model(moe.model, copy.deepcopy(peft_config))
        lora = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    return ModelSize(
        total=counts["total"],
        routed_experts=counts["routed_experts"],
        router=sum(p.numel() for layer in moe.layers for p in layer.router.parameters()),
        largest_tensor=largest,
        largest_unit=max(units.values()),
        largest_experts=max(layer.expert_parameters for layer in moe.layers),
        experts_per_layer=moe.experts_per_layer,
        lora=lora,
    )


def kept_counts(moe: MoEModel, pruning: float | dict[int, int]) -> dict[int, int]:
    """Experts every MoE layer keeps: a ratio keeps ``round(E x (1 - ratio))`` (at least top-k) in every layer; a
    dict gives the counts of the layers it names (the others keep all)."""
    if isinstance(pruning, dict):
        unknown = sorted(set(pruning) - set(moe.layer_indices))
        if unknown:
            raise ConfigurationError(
                f"Expert counts given for decoder layers {unknown}, which are not MoE layers; the MoE layers are "
                f"{moe.layer_indices}."
            )
        return {layer: int(pruning.get(layer, n)) for layer, n in moe.experts_per_layer.items()}
    if not 0.0 <= pruning < 1.0:
        raise ConfigurationError(f"pruning_ratio must be in [0, 1), got {pruning}.")
    return {layer: max(moe.top_k, round(n * (1 - pruning))) for layer, n in moe.experts_per_layer.items()}


def pruned_structure(config, counts: dict[int, int]) -> MoEModel:
    """The meta-device model with ``counts`` experts per MoE layer, built as a pruned checkpoint is loaded."""
    config = copy.deepcopy(config)
    update_config(config, counts, None)
    return structure_from_config(config)


# ---- the estimate ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    """One phase of a run on one rank: what it holds in host and GPU memory, by part (bytes)."""

    name: str
    what: str
    host: dict[str, int]
    gpu: dict[str, int]

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())

    @property
    def gpu_bytes(self) -> int:
        return sum(self.gpu.values())


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-rank memory of every phase of a run, with the settings it was made for (``describe()`` for logs)."""

    phases: tuple[Phase, ...]
    before: ModelSize
    after: ModelSize
    settings: dict = field(default_factory=dict)

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)

    @property
    def peak_host_bytes(self) -> int:
        return max(p.host_bytes for p in self.phases)

    @property
    def peak_gpu_bytes(self) -> int:
        return max(p.gpu_bytes for p in self.phases)

    def describe(self) -> str:
        """A short table: host and GPU GiB per rank for every phase, its two largest GPU parts, and the peak."""
        s = self.settings
        stage = f"ZeRO-{s['zero_stage']}" if s["zero_stage"] else "DDP"
        lines = [
            f"Memory per rank (estimate): {self.before.total / 1e9:.2f}B -> {self.after.total / 1e9:.2f}B "
            f"parameters, {s['num_processes']} processes, {stage}, {s['training']}, teacher {s['teacher']}, "
            f"prune_mode {s['prune_mode']}",
            f"{'phase':<8} {'host GiB':>9} {'GPU GiB':>8}  largest GPU parts",
        ]
        for p in self.phases:
            lines.append(f"{p.name:<8} {gib(p.host_bytes):>9.1f} {gib(p.gpu_bytes):>8.1f}  {_largest_parts(p.gpu)}")
        lines.append(f"{'peak':<8} {gib(self.peak_host_bytes):>9.1f} {gib(self.peak_gpu_bytes):>8.1f}")
        return "\n".join(lines)


def gib(n: int) -> float:
    return n / GIB


def _largest_parts(parts: dict[str, int], count: int = 2) -> str:
    top = sorted(((v, k) for k, v in parts.items() if v > 0 and k != "runtime"), reverse=True)[:count]
    return ", ".join(f"{k} {gib(v):.1f}" for v, k in top)


def _per_rank(total: int | float, ranks: int) -> int:
    return math.ceil(total / ranks)


@dataclass(frozen=True)
class _Shape:
    """The config fields the activation and KV-cache estimates read."""

    layers: int
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    top_k: int
    expert_width: int  # parameters of one routed expert per hidden unit

    @classmethod
    def of(cls, config, moe: MoEModel) -> _Shape:
        config = text_config(config)
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            vocab=config.vocab_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            top_k=moe.top_k,
            expert_width=max(layer.expert_parameters // layer.num_experts for layer in moe.layers)
            // config.hidden_size,
        )

    def working_set(self, batch: int, seq: int, dtype_bytes: int, eager: bool) -> int:
        """One layer's activations for ``batch x seq`` tokens (see the module docstring)."""
        per_token = ACTIVATION_HIDDEN_MULTIPLE * self.hidden + self.top_k * self.expert_width
        scores = batch * self.heads * seq * seq * (dtype_bytes + 4) if eager else 0
        return batch * seq * per_token * dtype_bytes + scores

    def kv_cache(self, batch: int, positions: int, dtype_bytes: int) -> int:
        return batch * positions * self.layers * 2 * self.kv_heads * self.head_dim * dtype_bytes


def estimate_memory(
    config,
    *,
    pruning_ratio: float | None = None,
    experts_after: dict[int, int] | None = None,
    num_processes: int = 1,
    zero_stage: int | None = None,
    training: str = "full",
    peft_config=None,
    dtype_bytes: int = 2,
    teacher: str = "none",
    per_device_train_batch_size: int = 1,
    max_length: int = 512,
    gradient_checkpointing: bool = True,
    prune_mode: str = "memory",
    measure: bool = True,
    measure_batch_size: int | None = None,
    measure_max_length: int | None = None,
    generation_batch_size: int = 16,
    max_new_tokens: int = 256,
    eager_attention: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> MemoryEstimate:
    """Host and GPU bytes per rank of every phase of a run (``measure``, ``prune``, ``load``, ``train``, ``eval``).

    ``zero_stage`` None is DDP (or one process without DeepSpeed). ``training`` ``lora`` needs ``peft_config`` (the
    ``LoraConfig`` the run uses; its adapters are counted on the pruned meta model). ``teacher``: ``live`` (a copy of
    the unpruned model next to the student), ``precomputed`` (logits computed in the measure phase) or ``none``.
    ``measure`` False: no measure phase (a given plan and no teacher logits to compute). The measure batch defaults
    to the training batch.
    """
    _check_choice(training, TRAINING_MODES, "training")
    _check_choice(teacher, TEACHERS, "teacher")
    _check_choice(prune_mode, PRUNE_MODES, "prune_mode")
    if (pruning_ratio is None) == (experts_after is None):
        raise ConfigurationError("Give either pruning_ratio or experts_after (expert counts per MoE layer).")
    if zero_stage not in (None, 2, 3):
        raise ConfigurationError(f"zero_stage must be None (DDP), 2 or 3 (the accelerate configs), got {zero_stage}.")
    if training == "lora" and peft_config is None:
        raise ConfigurationError("training 'lora' needs peft_config (the LoraConfig of the run) to count adapters.")
    if num_processes < 1:
        raise ConfigurationError(f"num_processes must be at least 1, got {num_processes}.")
    unpruned = structure_from_config(config)
    shape = _Shape.of(config, unpruned)
    counts = kept_counts(unpruned, experts_after if experts_after is not None else pruning_ratio)
    before = model_size(unpruned)
    after = model_size(pruned_structure(config, counts), peft_config if training == "lora" else None)
    rank = _RankMemory(
        before, after, shape, num_processes, zero_stage, training, dtype_bytes, teacher,
        per_device_train_batch_size, max_length, gradient_checkpointing, prune_mode, eager_attention,
    )  # fmt: skip
    measure_tokens = (measure_batch_size or per_device_train_batch_size, measure_max_length or max_length)
    phases = rank.phases(measure, measure_tokens, (generation_batch_size, max_new_tokens), shard_bytes)
    settings = {
        "pruning_ratio": round(1 - sum(counts.values()) / sum(before.experts_per_layer.values()), 6),
        "num_processes": num_processes,
        "zero_stage": zero_stage,
        "training": training,
        "teacher": teacher,
        "per_device_train_batch_size": per_device_train_batch_size,
        "max_length": max_length,
        "gradient_checkpointing": gradient_checkpointing,
        "prune_mode": prune_mode,
        "generation_batch_size": generation_batch_size,
    }
    return MemoryEstimate(tuple(phases), before, after, settings)


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise ConfigurationError(f"{name} must be one of {', '.join(choices)}, got {value!r}.")


@dataclass(frozen=True)
class _RankMemory:
    """The arithmetic of :func:`estimate_memory`, one method per quantity."""

    before: ModelSize
    after: ModelSize
    shape: _Shape
    ranks: int
    stage: int | None
    training: str
    b: int
    teacher: str
    batch: int
    seq: int
    checkpointing: bool
    prune_mode: str
    eager: bool

    @property
    def deepspeed(self) -> bool:
        return self.stage is not None

    @property
    def trainable(self) -> int:
        return {"full": self.after.total, "lora": self.after.lora, "router_only": self.after.router}.get(
            self.training, 0
        )

    @property
    def trainable_bytes(self) -> int:
        """Bytes per trainable parameter: fp32 adapters (unless DeepSpeed casts them), else the dtype."""
        return ADAPTER_BYTES if self.training == "lora" and not self.deepspeed else self.b

    def weights(self, size: ModelSize) -> int:
        """A model's weights on one GPU: partitioned under ZeRO-3, whole otherwise."""
        total = size.total * self.b
        return _per_rank(total, self.ranks) if self.stage == 3 else total

    def training_state(self) -> dict[str, int]:
        """Weights (with LoRA adapters), gradients and optimizer state of the pruned model on one GPU."""
        n, own = self.trainable, self.trainable_bytes
        adapters = self.after.lora * own
        weights = self.weights(self.after) + (_per_rank(adapters, self.ranks) if self.stage == 3 else adapters)
        if self.stage is None:
            copies = 2 if self.ranks > 1 else 1  # DDP's all-reduce buckets next to the gradients
            return {"weights": weights, "gradients": copies * n * own, "optimizer": 2 * n * own}
        gradient_bytes = FP32_GRADIENT_BYTES + (self.b if self.stage == 2 else 0)
        return {
            "weights": weights,
            "gradients": _per_rank(n * gradient_bytes, self.ranks),
            "optimizer": _per_rank(n * ADAM_DEEPSPEED_BYTES, self.ranks),
        }

    def gathered(self) -> int:
        """What ZeRO-3 gathers at a time: two units of the largest model in use."""
        if self.stage != 3:
            return 0
        unit = max(self.after.largest_unit, self.before.largest_unit if self.teacher == "live" else 0)
        return ZERO3_GATHERED_UNITS * unit * self.b

    def activations(self) -> int:
        s, tokens = self.shape, self.batch * self.seq
        working = s.working_set(self.batch, self.seq, self.b, self.eager)
        checkpointed = s.layers * tokens * s.hidden * self.b + 2 * working
        layers = checkpointed if self.checkpointing else s.layers * working
        return layers + tokens * s.vocab * LOGIT_BYTES_TRAIN

    def teacher_weights(self) -> dict[str, int]:
        """A live teacher on the GPUs: the unpruned model, partitioned like the student under ZeRO-3."""
        return {"teacher weights": self.weights(self.before)} if self.teacher == "live" else {}

    def teacher_logits(self) -> dict[str, int]:
        if self.teacher != "live":
            return {}
        return {"teacher logits": self.batch * self.seq * self.shape.vocab * LOGIT_BYTES_INFER}

    def host_teacher_copy(self) -> dict[str, int]:
        """Today a live teacher is a copy of the unpruned model made in host memory before pruning."""
        if self.teacher == "live" and self.prune_mode == "memory":
            return {"teacher copy": self.before.total * self.b}
        return {}

    def phases(self, measure: bool, measure_tokens: tuple[int, int], generation: tuple[int, int], shard: int):
        """The phases in the order a rank runs them."""
        if self.prune_mode == "memory":
            phases = self._in_memory(measure, measure_tokens)
        else:
            phases = self._on_disk(measure, measure_tokens, shard)
        if self.training == "prune_only":
            state = {"weights": self.weights(self.after)}
        else:
            state = self.training_state()
            train = {
                **state,
                "ZeRO-3 gathered layers": self.gathered(),
                "activations": self.activations(),
                **self.teacher_weights(),
                **self.teacher_logits(),
            }
            phases.append(Phase("train", "one optimizer step", _host({}), _gpu(train)))
        return [*phases, self._eval(state, *generation)]

    def _measuring(self, batch: int, seq: int) -> dict[str, int]:
        working = self.shape.working_set(batch, seq, self.b, self.eager)
        logits = batch * seq * self.shape.vocab * LOGIT_BYTES_INFER
        return {"unpruned weights": self.before.total * self.b, "activations": working + logits}

    def _in_memory(self, measure: bool, measure_tokens: tuple[int, int]) -> list[Phase]:
        unpruned = self.before.total * self.b
        copy = self.host_teacher_copy()
        phases = [
            Phase("load", "the unpruned model in host memory", _host({"unpruned weights": unpruned, **copy}), _gpu({}))
        ]
        if measure:
            phases.append(
                Phase("measure", "the unpruned model on each GPU", _host(copy), _gpu(self._measuring(*measure_tokens)))
            )
        sliced = {"unpruned weights": unpruned, "pruned layer copy": self.after.largest_experts * self.b}
        phases.append(Phase("prune", "in memory, on each GPU", _host(copy), _gpu(sliced)))
        return phases

    def _on_disk(self, measure: bool, measure_tokens: tuple[int, int], shard: int) -> list[Phase]:
        in_transit = self.before.largest_tensor * self.b
        phases = []
        if measure:
            phases.append(
                Phase(
                    "measure",
                    "the unpruned model loaded straight to each GPU",
                    _host({"tensor in transit": in_transit}),
                    _gpu(self._measuring(*measure_tokens)),
                )
            )
        writer = {"streaming writer": in_transit + STREAM_WRITER_SLACK}
        phases.append(Phase("prune", "rank 0 prunes the checkpoint on disk", _host(writer), _gpu({})))
        if self.stage == 3:
            staging = {"checkpoint shard": min(shard, self.after.total * self.b)}
            what = "the pruned model, partitioned at load (zero.Init)"
        else:
            staging = {"tensor in transit": self.after.largest_tensor * self.b}
            what = "the pruned model on each GPU"
        phases.append(
            Phase("load", what, _host(staging), _gpu({"weights": self.weights(self.after), **self.teacher_weights()}))
        )
        return phases

    def _eval(self, state: dict[str, int], batch: int, new_tokens: int) -> Phase:
        """Translation generation, on top of the training state (the optimizer state stays allocated)."""
        s = self.shape
        generation = {
            "KV cache": s.kv_cache(batch, self.seq + new_tokens, self.b),
            "prefill activations": s.working_set(batch, self.seq, self.b, self.eager)
            + batch * s.vocab * EVAL_LOGIT_BYTES,
        }
        generation["ZeRO-3 gathered layers"] = self.gathered()
        what = "translation generation" + (", on partitioned weights" if self.stage == 3 else "")
        return Phase("eval", what, _host({}), _gpu({**state, **self.teacher_weights(), **generation}))


def _host(parts: dict[str, int]) -> dict[str, int]:
    """Host memory of one process: the runtime plus ``parts``."""
    return {"runtime": HOST_RUNTIME_BYTES, **parts}


def _gpu(parts: dict[str, int]) -> dict[str, int]:
    """GPU memory of one process: the runtime plus the non-zero ``parts``."""
    return {"runtime": GPU_RUNTIME_BYTES, **{name: v for name, v in parts.items() if v}}


# ---- refusing a run that cannot fit ---------------------------------------------------------------------------------
def check_memory_fits(estimate: MemoryEstimate, host_bytes_available: int | None, gpu_bytes_available: int | None):
    """Raise :class:`ConfigurationError` for the first phase whose host or GPU memory per rank exceeds what is
    available, naming the phase, the numbers and the knobs that would make it fit. None skips that check (no GPU)."""
    for phase in estimate.phases:
        for resource, need, available in (
            ("host", phase.host_bytes, host_bytes_available),
            ("GPU", phase.gpu_bytes, gpu_bytes_available),
        ):
            if available is not None and need > available:
                parts = phase.host if resource == "host" else phase.gpu
                fixes = "; ".join([*_knobs(estimate, phase, resource), "or `--check_memory false` to skip this check"])
                raise ConfigurationError(
                    f"Not enough {resource} memory for the {phase.name} phase ({phase.what}): each rank needs "
                    f"{gib(need):.1f} GiB (largest parts in GiB: {_largest_parts(parts, 3)}; an estimate of "
                    f"moe_specialist.memory) but {gib(available):.1f} GiB are available per rank. To fit: {fixes}."
                )


def _knobs(estimate: MemoryEstimate, phase: Phase, resource: str) -> list[str]:
    """The settings that shrink what does not fit, the most effective first."""
    s = estimate.settings
    whole, stage, parts = s["prune_mode"] == "memory", s["zero_stage"], phase.gpu

    def large(name: str) -> bool:
        return parts.get(name, 0) >= 0.15 * phase.gpu_bytes

    knobs = []
    if resource == "host":
        if whole and phase.name in ("load", "measure", "prune"):
            knobs.append("`prune_mode: disk` (the unpruned model goes straight to the GPUs, pruned on disk)")
        if s["teacher"] == "live" and whole:
            knobs.append("precomputed teacher logits (`teacher_logits: DIR`) instead of a live teacher copy")
        knobs.append("fewer processes on this node")
        return knobs
    if phase.name in ("measure", "prune") and "unpruned weights" in parts:
        knobs.append(
            "GPUs with more memory: the unpruned model must fit one GPU to be measured and pruned, unless the plan, "
            "statistics and teacher logits come from elsewhere (`prune_plan`, `statistics_file`, `teacher_logits`)"
        )
        if large("activations"):
            knobs.append("a smaller `calibration_batch_size` or `calibration_max_length`")
        return knobs
    if stage != 3 and s["training"] != "lora":
        knobs.append("`accelerate_configs/zero3.yaml` (weights, gradients and optimizer state partitioned)")
    if stage == 3:
        knobs.append(f"more processes than {s['num_processes']} (ZeRO-3 divides weights and optimizer state by them)")
    if s["training"] == "full" and stage != 3:
        knobs.append("`use_peft: true` (LoRA: adapters and their optimizer state only)")
    knobs.append(f"a higher `pruning_ratio` than {s['pruning_ratio']:g}")
    if large("activations") and not s["gradient_checkpointing"]:
        knobs.append("`gradient_checkpointing: true`")
    if large("activations"):
        knobs.append(
            f"a smaller `per_device_train_batch_size` than {s['per_device_train_batch_size']} (raise "
            "`gradient_accumulation_steps` to keep the global batch)"
        )
    if large("KV cache") or large("prefill activations"):
        knobs.append(f"a smaller `generation_batch_size` than {s['generation_batch_size']}")
    if s["teacher"] == "live":
        knobs.append("precomputed teacher logits (`teacher_logits: DIR`) instead of a live teacher")
    return knobs


def available_memory(local_processes: int | None = None) -> tuple[int | None, int | None]:
    """(host, GPU) bytes one rank can use: the host's available memory shared by the processes on this node
    (``LOCAL_WORLD_SIZE`` unless given), and the free memory of this rank's GPU (``LOCAL_RANK``, as accelerate
    places it); None where it cannot be read (no ``/proc/meminfo``, no GPU), so that check is skipped."""
    local = local_processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    host = None
    if MEMINFO.is_file():
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                host = int(line.split()[1]) * 1024 // local
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())[0]
    return host, gpu


# ---- a recipe's run -------------------------------------------------------------------------------------------------
def estimate_for_run(
    model_config,
    pruning: float | dict[int, int],
    training_args,
    num_processes: int,
    prune_mode: str,
    *,
    zero_stage: int | None,
    peft_config=None,
    calibration_args=None,
    attn_implementation: str | None = None,
    measure: bool = True,
    dtype_bytes: int = 2,
) -> MemoryEstimate:
    """:func:`estimate_memory` for a recipe: ``training_args`` is its ``SFTConfig``; ``pruning`` the ratio or the
    plan's expert counts per layer. The fields of the other dataclasses come as plain values: ``peft_config`` is
    ``trl.get_peft_config(model_args)`` (None without LoRA), ``attn_implementation`` the model's, ``zero_stage`` the
    launch's (None for DDP); ``calibration_args`` sizes the measure batch (the larger of calibration and training)."""
    if training_args.prune_only:
        training = "prune_only"
    elif peft_config is not None:
        training = "lora"
    else:
        training = "router_only" if training_args.train_router_only else "full"
    teacher = "none"
    if training_args.uses_teacher:
        teacher = "precomputed" if training_args.teacher_logits else "live"
    batch, seq = training_args.per_device_train_batch_size, training_args.max_length
    if calibration_args is not None:
        calibration = (calibration_args.calibration_batch_size, calibration_args.calibration_max_length)
        batch, seq = max((batch, seq), calibration, key=lambda b_s: b_s[0] * b_s[1])
    ratio_or_counts = {"experts_after": pruning} if isinstance(pruning, dict) else {"pruning_ratio": pruning}
    return estimate_memory(
        model_config,
        **ratio_or_counts,
        num_processes=num_processes,
        zero_stage=zero_stage,
        training=training,
        peft_config=peft_config,
        dtype_bytes=dtype_bytes,
        teacher=teacher,
        per_device_train_batch_size=training_args.per_device_train_batch_size,
        max_length=training_args.max_length,
        gradient_checkpointing=bool(training_args.gradient_checkpointing),
        prune_mode=prune_mode,
        measure=measure,
        measure_batch_size=batch,
        measure_max_length=seq,
        generation_batch_size=training_args.generation_batch_size,
        max_new_tokens=training_args.max_new_tokens,
        eager_attention=attn_implementation == "eager",
    )
