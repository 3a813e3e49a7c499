"""Recovery after pruning: the loss a run minimises, and the trainer that computes it.

``recovery`` (a recipe key) picks what the pruned student learns from:

- ``sft``: cross-entropy on the reference translations (completion tokens);
- ``kd``: distillation from the unpruned model (the teacher) on the same completion tokens: forward KL, or the
  generalized Jensen-Shannon divergence of GKD with ``kd_beta`` (0 = forward KL, 0.5 = JSD, 1 = reverse KL), at
  ``kd_temperature``;
- ``kd+ce``: ``kd_alpha`` x KD + (1 - ``kd_alpha``) x CE (SlimQwen: the mix beats either alone);
- ``router_kd``: only the routers train, on KD over every token of the pairs (source and target text, the
  references used as unlabeled text, never as labels).

The student's logits are computed only where a loss applies (:func:`add_compact_lm_head`): the LM head over every
position was a third of a CPU step on the demo, where a quarter of the positions carry a loss.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput
from trl import SFTTrainer

from moe_specialist.compat import load_balancing_loss, trainer_metrics

RECOVERY_MODES = ("sft", "kd", "kd+ce", "router_kd")


def uses_teacher(recovery: str) -> bool:
    return recovery != "sft"


def loss_weights(recovery: str, kd_alpha: float) -> tuple[float, float]:
    """(CE weight, KD weight) of a recovery mode."""
    return {"sft": (1.0, 0.0), "kd": (0.0, 1.0), "router_kd": (0.0, 1.0), "kd+ce": (1.0 - kd_alpha, kd_alpha)}[
        recovery
    ]


# ---- logits where a loss applies ------------------------------------------------------------------------------------
@dataclass
class CompactOutput(ModelOutput):
    """Logits at the selected next-token positions only (``[positions, vocab]``), and the router aux loss."""

    logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def logit_scale(config) -> float:
    """The factor a causal LM multiplies its LM-head output by (GraniteMoE divides by ``logits_scaling``)."""
    text = config.get_text_config()
    if getattr(text, "final_logit_softcapping", None):
        raise NotImplementedError("final_logit_softcapping is not supported by the compact LM head.")
    scaling = getattr(text, "logits_scaling", None)
    return 1.0 / scaling if scaling else 1.0


def add_compact_lm_head(model) -> None:
    """``model(..., positions=mask)`` returns :class:`CompactOutput` with the logits of the positions ``mask``
    ([batch, seq - 1], position t predicts token t + 1) selects; without ``positions`` the forward is unchanged.

    The head runs inside the model's forward, so DDP and DeepSpeed see one forward as usual; the original forward is
    looked up on the class, so a copy of the model (the teacher) runs its own weights, and adding it twice changes
    nothing. Add it before PEFT wraps the model (PEFT passes ``positions`` through).
    """
    scale = logit_scale(model.config)

    @functools.wraps(type(model).forward)
    def forward(self, *args, positions: torch.Tensor | None = None, **kwargs):
        if positions is None:
            return type(self).forward(self, *args, **kwargs)
        kwargs["use_cache"] = False
        backbone = self.base_model(*args, **kwargs)
        hidden = backbone.last_hidden_state[:, :-1][positions]
        logits = self.get_output_embeddings()(hidden)
        if scale != 1.0:
            logits = logits * scale
        aux = None
        if kwargs.get("output_router_logits"):
            aux = load_balancing_loss(self.config, backbone.router_logits, kwargs.get("attention_mask"))
        return CompactOutput(logits=logits, aux_loss=aux)

    model.forward = types.MethodType(forward, model)


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """Next-token positions with a label: ``[batch, seq - 1]`` booleans."""
    return labels[:, 1:] != -100


# ---- divergences ----------------------------------------------------------------------------------------------------
def generalized_jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float, temperature: float) -> torch.Tensor:
    """Per-position generalized JSD of GKD (Agarwal et al., Eq. 1) between full-vocabulary logits ``[N, V]``:
    beta 0 is KL(teacher || student), beta 1 is KL(student || teacher)."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    mixture = torch.logsumexp(
        torch.stack([s + torch.log1p(torch.tensor(-beta)), t + torch.log(torch.tensor(beta))]), 0
    )
    return beta * (t.exp() * (t - mixture)).sum(-1) + (1 - beta) * (s.exp() * (s - mixture)).sum(-1)


def top_k_forward_kl(
    student: torch.Tensor, teacher_ids: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per-position KL(teacher || student) with the teacher known on its top-k tokens only (``[N, k]`` ids and
    logits): the teacher renormalised over them, the student's full-vocabulary log-probabilities read there. Equal to
    the forward KL when k is the vocabulary."""
    s = F.log_softmax(student.float() / temperature, dim=-1).gather(-1, teacher_ids.long())
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1)


# ---- the trainer ----------------------------------------------------------------------------------------------------
class RecoveryTrainer(SFTTrainer):
    """``SFTTrainer`` whose loss is the run's recovery mode; everything else (data, callbacks, DeepSpeed, PEFT,
    checkpoints) is TRL's. A distillation mode builds its teacher once TRL has prepared the data and before pruning
    (:class:`~moe_specialist.training.teacher.TeacherSetup`, the first callback): ``teacher_snapshot`` is the teacher
    model when the run needs a separate one (see ``pipeline.load_teacher``); KD is scaled by the temperature squared
    (Hinton), so that its gradients keep their size across temperatures."""

    def __init__(self, *args, teacher_snapshot=None, teacher_name: str | None = None, callbacks=None, **kwargs):
        from moe_specialist.training.teacher import TeacherSetup

        setup = TeacherSetup(teacher_snapshot, teacher_name)
        setup.trainer = self  # its on_init_end reads the prepared data
        super().__init__(*args, callbacks=[setup, *(callbacks or [])], **kwargs)
        self.ce_weight, self.kd_weight = loss_weights(self.args.recovery, self.args.kd_alpha)
        self.teacher = setup.teacher
        if self.teacher is not None:
            self.teacher.prepare(self)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        labels = inputs["labels"]
        positions = loss_positions(labels)
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "use_cache")}
        if self.aux_loss_enabled:
            model_inputs["output_router_logits"] = True
        outputs = model(**model_inputs, positions=positions)
        logits = outputs.logits.float()
        targets = labels[:, 1:][positions]
        count = positions.sum()
        denominator = torch.as_tensor(count if num_items_in_batch is None else num_items_in_batch).clamp(min=1)

        log_probs = F.log_softmax(logits, dim=-1)
        ce = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        loss = self.ce_weight * ce.sum() / denominator if self.ce_weight else logits.new_zeros(())
        kd = None
        if self.kd_weight:
            kd = self.teacher.divergence(logits, inputs, positions, self.args) * self.args.kd_temperature**2
            loss = loss + self.kd_weight * kd.sum() / denominator
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        if outputs.aux_loss is not None:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps

        metrics = trainer_metrics(self, mode)
        gather = self.accelerator.gather_for_metrics
        valid = gather(count.reshape(1)).sum().clamp(min=1)
        metrics["ce"].append((gather(ce.detach().sum().reshape(1)).sum() / valid).item())
        metrics["mean_token_accuracy"].append(
            (gather((log_probs.argmax(-1) == targets).sum().reshape(1)).sum() / valid).item()
        )
        if kd is not None:
            metrics["kd"].append((gather(kd.detach().sum().reshape(1)).sum() / valid).item())
        if outputs.aux_loss is not None:
            metrics["aux_loss"].append(gather(outputs.aux_loss.detach().reshape(1)).mean().item())
        return (loss, outputs) if return_outputs else loss
