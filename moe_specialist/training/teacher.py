"""The teacher of a distillation recovery: the unpruned model, run live, or its top-k logits computed once.

- **Live** (:class:`LiveTeacher`): a frozen copy of the model taken before pruning (or ``teacher_model_name_or_path``)
  runs on every batch next to the student: exact full-vocabulary KD or generalized JSD, at the memory of a second
  model (under ZeRO-3 it is partitioned like the student) and about one more forward per step.
- **Precomputed** (:class:`PrecomputedTeacher`, ``teacher_logits: DIR``): the teacher's ``teacher_top_k`` most likely
  next tokens and their logits at every position of every SFT sequence, computed once before training by the model
  itself just before it is pruned (:class:`TeacherSetup`; each rank computes its share) and stored in ``DIR`` keyed
  by the sequence's token ids, so that reruns, other ratios and sweep points reuse it; no second model is held. KD
  is then the forward KL over the teacher's top-k (:func:`~moe_specialist.training.recovery.top_k_forward_kl`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import TrainerCallback

from moe_specialist.errors import ConfigurationError, MissingInputError
from moe_specialist.io import atomic_write_json
from moe_specialist.training.callbacks import is_zero3_partitioned
from moe_specialist.training.recovery import add_compact_lm_head, generalized_jsd, top_k_forward_kl

logger = logging.getLogger(__name__)

TEACHER_META_FILE = "teacher_logits.json"


def sequence_key(token_ids: torch.Tensor) -> bytes:
    """The key of one (unpadded) token sequence in a table of teacher logits."""
    return hashlib.sha256(token_ids.to(torch.int64).cpu().numpy().tobytes()).digest()


def keyed_sequences(datasets: list) -> dict[bytes, list[int]]:
    """Every distinct token sequence of TRL-prepared ``datasets`` (``input_ids``), by its key."""
    return {sequence_key(torch.tensor(ids)): ids for data in datasets for ids in data["input_ids"]}


def part_name(rank: int, world: int) -> str:
    return f"part-{rank:05d}-of-{world:05d}.safetensors"


def real_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row's tokens without padding (TRL pads on the right)."""
    return [row[mask.bool()] for row, mask in zip(input_ids, attention_mask, strict=True)]


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    add_compact_lm_head(model)
    return model


class LiveTeacher:
    """The teacher model itself, run under ``no_grad`` on the student's batch and positions."""

    def __init__(self, model: torch.nn.Module):
        self.model = frozen(model)

    def prepare(self, trainer) -> None:
        """On the student's device; under DeepSpeed an inference engine (ZeRO-3 partitions it like the student)."""
        if trainer.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            self.model = prepare_deepspeed(self.model, trainer.accelerator)
        else:
            self.model.to(trainer.args.device)

    def divergence(self, student_logits, inputs, positions, args) -> torch.Tensor:
        with torch.no_grad():
            teacher = self.model(
                input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), positions=positions
            ).logits
        return generalized_jsd(student_logits, teacher, args.kd_beta, args.kd_temperature)


class PrecomputedTeacher:
    """Top-k teacher logits looked up by sequence (see the module docstring)."""

    def __init__(self, directory: str | Path, top_k: int):
        self.directory = Path(directory)
        meta = read_meta(self.directory)
        if meta["top_k"] != top_k:
            raise ConfigurationError(
                f"teacher_logits {self.directory} holds the top {meta['top_k']} logits, the recipe asks for "
                f"teacher_top_k {top_k}: set teacher_top_k: {meta['top_k']}, or point teacher_logits elsewhere."
            )
        keys, offsets, ids, logits = [], [], [], []
        total = 0
        for part in meta["parts"]:
            with safe_open(self.directory / part, framework="pt") as f:
                part_offsets = f.get_tensor("offsets")
                keys.append(f.get_tensor("keys"))
                offsets.append(part_offsets[:-1] + total)
                ids.append(f.get_tensor("ids"))
                logits.append(f.get_tensor("logits"))
                total += int(part_offsets[-1])
        self.ids, self.logits = torch.cat(ids), torch.cat(logits)
        starts = torch.cat(offsets).tolist()
        self.rows = {bytes(k.tolist()): start for k, start in zip(torch.cat(keys), starts, strict=True)}
        self.meta = meta

    def prepare(self, trainer) -> None:
        pass

    def lookup(self, inputs, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher top-k ids and logits at ``positions`` ([batch, seq - 1]), in ``hidden[positions]``'s order."""
        rows = []
        for b, tokens in enumerate(real_tokens(inputs["input_ids"], inputs["attention_mask"])):
            start = self.rows.get(sequence_key(tokens))
            if start is None:
                raise MissingInputError(
                    f"An SFT sequence of {len(tokens)} tokens is not in teacher_logits {self.directory}: it was "
                    "computed on other data or another tokenization. Delete the directory (it is recomputed) or "
                    "point teacher_logits elsewhere."
                )
            selected = positions[b].nonzero().squeeze(-1).cpu()
            if len(selected) and selected.max() >= len(tokens) - 1:
                raise ConfigurationError("A loss position lies on padding: teacher logits exist for real tokens only.")
            rows.append(start + selected)
        index = torch.cat(rows)
        device = positions.device
        return self.ids[index].to(device), self.logits[index].to(device)

    def divergence(self, student_logits, inputs, positions, args) -> torch.Tensor:
        ids, logits = self.lookup(inputs, positions)
        return top_k_forward_kl(student_logits, ids, logits, args.kd_temperature)


def read_meta(directory: Path) -> dict:
    path = directory / TEACHER_META_FILE
    if not path.is_file():
        raise MissingInputError(f"teacher_logits {directory} has no {TEACHER_META_FILE}: it is not a complete table.")
    return json.loads(path.read_text())


@torch.no_grad()
def compute_teacher_logits(
    model, datasets: list, directory: str | Path, top_k: int, batch_size: int, pad_token_id: int, teacher: str
) -> None:
    """Top-``top_k`` logits of ``model`` at every next-token position of every sequence of ``datasets`` (TRL-prepared:
    ``input_ids``), written to ``directory``: each rank computes and writes its share, rank 0 the index last."""
    state = PartialState()
    directory = Path(directory)
    ordered = sorted(keyed_sequences(datasets).items())
    mine = ordered[state.process_index :: state.num_processes]
    device = next(model.parameters()).device
    keys, offsets, ids_out, logits_out = [], [0], [], []
    for start in tqdm(range(0, len(mine), batch_size), desc="teacher logits", disable=not state.is_main_process):
        batch = mine[start : start + batch_size]
        width = max(len(ids) for _, ids in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, (_, ids) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
        positions = attention[:, 1:].bool()
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), positions=positions).logits
        top = logits.float().topk(top_k, dim=-1)
        ids_out.append(top.indices.to(torch.int32).cpu())
        logits_out.append(top.values.to(torch.float16).cpu())
        for key, ids in batch:
            keys.append(torch.tensor(list(key), dtype=torch.uint8))
            offsets.append(offsets[-1] + len(ids) - 1)
    part = part_name(state.process_index, state.num_processes)
    tensors = {
        "keys": torch.stack(keys) if keys else torch.zeros((0, 32), dtype=torch.uint8),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
        "ids": torch.cat(ids_out) if ids_out else torch.zeros((0, top_k), dtype=torch.int32),
        "logits": torch.cat(logits_out) if logits_out else torch.zeros((0, top_k), dtype=torch.float16),
    }
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{part}.tmp"
    save_file(tensors, tmp)
    tmp.replace(directory / part)
    state.wait_for_everyone()
    if state.is_main_process:
        parts = [part_name(rank, state.num_processes) for rank in range(state.num_processes)]
        meta = {"teacher": teacher, "top_k": top_k, "sequences": len(ordered), "parts": parts}
        atomic_write_json(meta, directory / TEACHER_META_FILE)
    state.wait_for_everyone()


def teacher_logits_ready(args) -> bool:
    """True when ``teacher_logits`` names a complete table (no teacher needs loading)."""
    return bool(args.teacher_logits) and (Path(args.teacher_logits) / TEACHER_META_FILE).is_file()


class TeacherSetup(TrainerCallback):
    """Builds the run's teacher in ``on_init_end``, as the first of the run's callbacks: TRL has prepared the data and
    the model is not pruned yet (``expert_pruning`` comes after), so precomputed logits are computed with the model
    itself, on the device it is on, without a copy. ``snapshot`` is the teacher model when the run needs one (a live
    teacher, ``teacher_model_name_or_path``, or LoRA, whose model is pruned before the trainer exists)."""

    def __init__(self, snapshot: torch.nn.Module | None, teacher_name: str):
        self.snapshot, self.teacher_name = snapshot, teacher_name
        self.teacher: LiveTeacher | PrecomputedTeacher | None = None
        self.trainer = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if not args.uses_teacher:
            return
        if not args.teacher_logits:
            self.teacher = LiveTeacher(self.snapshot)
        else:
            if not teacher_logits_ready(args):
                self.compute(args, self.snapshot if self.snapshot is not None else model)
            self.teacher = PrecomputedTeacher(args.teacher_logits, args.teacher_top_k)
            recorded = self.teacher.meta["teacher"]
            if recorded != self.teacher_name:
                raise ConfigurationError(
                    f"teacher_logits {args.teacher_logits} was computed with the teacher {recorded}, this run's "
                    f"teacher is {self.teacher_name}: point teacher_logits elsewhere (or delete it to recompute)."
                )
            keys = keyed_sequences(self.datasets()).keys()
            missing = len(keys - self.teacher.rows.keys())
            if missing:
                raise MissingInputError(
                    f"teacher_logits {args.teacher_logits} lacks {missing} of this run's {len(keys)} SFT sequences "
                    "(it was computed on other data or another tokenization): point teacher_logits elsewhere, or "
                    "delete it to recompute."
                )
        self.snapshot = None

    def datasets(self) -> list:
        """The trainer's prepared SFT data (and eval data: the Trainer's eval loss distils too)."""
        return [d for d in (self.trainer.train_dataset, self.trainer.eval_dataset) if d is not None]

    def compute(self, args, model) -> None:
        from peft import PeftModel

        if isinstance(model, PeftModel):
            raise ConfigurationError("Teacher logits cannot be computed with a model already pruned and wrapped.")
        logger.info("Computing the teacher's top-%d logits into %s (once; later runs reuse them).",
                    args.teacher_top_k, args.teacher_logits)  # fmt: skip
        add_compact_lm_head(model)  # a no-op for the student, which has it already
        if is_zero3_partitioned(model):  # prune_mode disk: the source model, partitioned as it loaded
            from trl.models import prepare_deepspeed

            model = prepare_deepspeed(model, self.trainer.accelerator)
        elif next(model.parameters()).device != args.device:  # as for calibration: the Trainer has not placed it
            logger.info("Moving the model to %s to compute the teacher logits.", args.device)
            model.to(args.device)
        was_training = model.training
        model.eval()
        try:
            compute_teacher_logits(
                model, self.datasets(), args.teacher_logits, args.teacher_top_k, args.per_device_train_batch_size,
                self.trainer.processing_class.pad_token_id, self.teacher_name,
            )  # fmt: skip
        finally:
            model.train(was_training)
