"""Compensation after pruning: re-fit the kept experts of each MoE layer to reproduce the unpruned layer's output.

Removing experts changes each MoE block's output on the tokens that were routed to them; the kept experts can absorb
part of that change. :func:`prune_and_refit` goes layer by layer, in order: it captures the inputs of the block
(after the earlier layers were pruned and re-fitted, so each layer corrects what reaches it), takes the block's
output on those same inputs as the target while it is still whole, prunes it, and trains only its expert tensors to
match the target on real tokens. The router is frozen, so the routing among the kept experts stays what the plan's
pruning gives. A least-squares fit on a few hundred sequences overfits (a naive ridge re-fit lost to plain removal
on the demo), so every layer is scored on held-out sequences: the best step by held-out error is kept, and a layer
that does not improve on held-out tokens gets its original weights back, bit for bit. Everything goes through the
modules' own forward and autograd, so it works for every architecture :func:`~moe_specialist.architectures.find_moe`
supports.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import torch
from torch import nn

from moe_specialist.architectures import MoELayer, MoEModel
from moe_specialist.errors import ConfigurationError
from moe_specialist.plan import PrunePlan
from moe_specialist.prune import PruneReport, prune_model
from moe_specialist.sensitivity import calibration_sample

logger = logging.getLogger(__name__)

CHUNK_TOKENS = 4096  # tokens per block forward when scoring (bounds the memory of one forward)


class _Captured(Exception):
    """Raised by the capture hook to stop a forward pass once the block's input is in hand."""


def _block_output(block: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The block's output ``[tokens, hidden]`` on ``inputs`` ``[tokens, hidden]`` (fed as one sequence: routed
    blocks treat tokens independently); blocks that return a tuple (e.g. GPT-OSS: output, router scores) give [0]."""
    output = block(inputs.unsqueeze(0).to(next(block.parameters()).dtype))
    output = output[0] if isinstance(output, tuple) else output
    return output.reshape(-1, output.shape[-1])


@torch.no_grad()
def _block_inputs(model: nn.Module, block: nn.Module, batches: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs of ``block`` on the real (non-padding) tokens of ``batches`` ``[tokens, hidden]``, and each
    token's sequence number ``[tokens]``; the forward stops at the block."""
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _Captured

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    inputs, sequences, offset = [], [], 0
    try:
        for input_ids, attention, *_ in batches:
            with suppress(_Captured):
                model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False)
            hidden = captured.pop().reshape(*attention.shape, -1)
            real = attention.bool()
            inputs.append(hidden[real.to(hidden.device)])
            rows = torch.arange(offset, offset + len(attention)).unsqueeze(1).expand_as(attention)
            sequences.append(rows[real])
            offset += len(attention)
    finally:
        handle.remove()
    return torch.cat(inputs), torch.cat(sequences)


@torch.no_grad()
def _outputs(block: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return torch.cat([_block_output(block, chunk) for chunk in inputs.split(CHUNK_TOKENS)])


@torch.no_grad()
def _error(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean squared error of the block's output against ``targets``, over tokens and hidden units."""
    total = sum(
        float((_block_output(block, x).float() - t.float()).pow(2).sum())
        for x, t in zip(inputs.split(CHUNK_TOKENS), targets.split(CHUNK_TOKENS), strict=True)
    )
    return total / max(1, targets.numel())


@contextmanager
def _in_float32(block: nn.Module) -> Iterator[None]:
    """A half-precision block is fitted in float32 (Adam's small updates vanish when rounded to bf16 every step),
    then cast back; a float32 block is left as it is. Untouched tensors round-trip exactly."""
    dtype = next(block.parameters()).dtype
    if dtype.itemsize >= 4:
        yield
        return
    block.float()
    try:
        yield
    finally:
        block.to(dtype)


@contextmanager
def _trainable(parameters: list[nn.Parameter]) -> Iterator[None]:
    """Gradients for ``parameters`` whatever their ``requires_grad`` was (a frozen model can be re-fitted too)."""
    flags = [p.requires_grad for p in parameters]
    for p in parameters:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(parameters, flags, strict=True):
            p.requires_grad_(flag)


def _fit_layer(
    block: nn.Module,
    parameters: list[nn.Parameter],
    fit: tuple[torch.Tensor, torch.Tensor],
    held_out: tuple[torch.Tensor, torch.Tensor],
    *,
    steps: int,
    learning_rate: float,
    batch_tokens: int,
    eval_every: int,
    proximal: float,
    generator: torch.Generator,
) -> dict:
    """Adam on ``parameters`` against the targets of ``fit``; the weights of the best step by held-out error stay
    (the original ones, exactly, when no step beats them)."""
    original = [p.detach().clone() for p in parameters]
    before = _error(block, *held_out)
    best, best_step, best_weights = before, 0, original
    if before > 0 and steps > 0:
        optimizer = torch.optim.Adam(parameters, lr=learning_rate)
        scale = sum(float(w.pow(2).sum()) for w in original) or 1.0
        inputs, targets = fit
        with _trainable(parameters), torch.enable_grad():
            for step in range(1, steps + 1):
                index = torch.randint(len(inputs), (min(batch_tokens, len(inputs)),), generator=generator)
                output = _block_output(block, inputs[index.to(inputs.device)])
                loss = (output.float() - targets[index.to(targets.device)].float()).pow(2).mean()
                if proximal:
                    drift = sum((p - w).pow(2).sum() for p, w in zip(parameters, original, strict=True))
                    loss = loss + proximal * drift / scale
                gradients = torch.autograd.grad(loss, parameters)
                for p, g in zip(parameters, gradients, strict=True):
                    p.grad = g
                optimizer.step()
                if step % eval_every == 0 or step == steps:
                    error = _error(block, *held_out)
                    if error < best:
                        best, best_step, best_weights = error, step, [p.detach().clone() for p in parameters]
        for p in parameters:
            p.grad = None
    with torch.no_grad():
        for p, w in zip(parameters, best_weights, strict=True):
            p.copy_(w)
    power = float(held_out[1].float().pow(2).mean())  # the scale the errors compare to
    return {
        "held_out_error_before": before,
        "held_out_error_after": best,
        "target_power": power,
        "steps_kept": best_step,
    }


def _held_out_sequences(batches: list, share: float, generator: torch.Generator) -> torch.Tensor:
    """The numbers of a seeded ``share`` of the sequences of ``batches`` (at least one, never all)."""
    total = sum(len(input_ids) for input_ids, *_ in batches)
    if total < 2:
        raise ConfigurationError(
            "Re-fitting experts holds out some calibration sequences, but the batches hold only one: pass more "
            "sequences, or held-out batches (held_out=...)."
        )
    count = min(total - 1, max(1, round(share * total)))
    return torch.randperm(total, generator=generator)[:count]


def prune_and_refit(
    model: nn.Module,
    plan: PrunePlan,
    moe: MoEModel | None = None,
    *,
    batches: list,
    held_out: list | None = None,
    steps: int = 200,
    learning_rate: float = 3e-3,
    batch_tokens: int = 1024,
    eval_every: int = 20,
    proximal: float = 0.0,
    held_out_share: float = 0.25,
    seed: int = 0,
) -> tuple[PruneReport, dict]:
    """Prune ``model`` in place with ``plan`` and re-fit each MoE layer's kept experts so that the pruned block
    reproduces the unpruned one on the same inputs; return the prune report and the trace.

    Layer by layer, in order: the block's inputs are captured (the earlier layers already pruned and re-fitted), the
    block's output on them is taken as the target while it is still whole, then the layer is pruned and fitted. So no
    copy of the unpruned model is needed: the peak memory is the model's own.

    ``batches`` are calibration batches ``(input_ids, attention_mask, ...)`` as
    :func:`moe_specialist.sensitivity.calibration_sample` gives them; only tokens with attention count. ``held_out``
    (batches of other sequences) scores each step; without it, ``held_out_share`` of the sequences of ``batches``
    is held out instead. Each layer runs ``steps`` Adam steps (``learning_rate``) on ``batch_tokens`` tokens drawn
    with ``seed``, scores every ``eval_every`` steps, keeps the best, and keeps its original weights unless the
    held-out error went down. ``proximal`` adds a penalty on the squared distance to the original expert weights
    (relative to their squared norm). The router, shared experts and every other tensor stay as they are.

    Defaults chosen on dev (benchmarks/compensation_dev.py, the demo at 50-87.5%): 200 steps at 3e-3 matched 400 at
    1e-3 in half the time and beat 200 at 1e-3.
    """
    if not batches:
        raise ConfigurationError("Re-fitting experts needs calibration batches to fit on; none were given.")
    if steps < 0 or learning_rate <= 0 or batch_tokens < 1 or eval_every < 1 or proximal < 0:
        raise ConfigurationError(
            f"Re-fit settings out of range (steps={steps}, learning_rate={learning_rate}, batch_tokens="
            f"{batch_tokens}, eval_every={eval_every}, proximal={proximal}): steps >= 0, learning_rate > 0, "
            "batch_tokens >= 1, eval_every >= 1 and proximal >= 0."
        )
    if held_out is None and not 0 < held_out_share < 1:
        raise ConfigurationError(f"held_out_share={held_out_share} must lie strictly between 0 and 1.")
    started = time.monotonic()
    logger.info("Pruning and re-fitting the kept experts layer by layer on %s", next(model.parameters()).device)
    training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    held_out_ids = None if held_out is not None else _held_out_sequences(batches, held_out_share, generator)
    layers, tokens = [], {}

    def refit_layer(layer: MoELayer, prune_layer: Callable[[], None]) -> None:
        inputs, sequences = _block_inputs(model, layer.block, batches)
        if held_out is None:
            mask = torch.isin(sequences, held_out_ids)
            held_inputs, inputs = inputs[mask.to(inputs.device)], inputs[~mask.to(inputs.device)]
        else:
            held_inputs, _ = _block_inputs(model, layer.block, held_out)
        tokens.update(fit=len(inputs), held_out=len(held_inputs))
        fit, checked = (inputs, _outputs(layer.block, inputs)), (held_inputs, _outputs(layer.block, held_inputs))
        prune_layer()
        with _in_float32(layer.block):
            trace = _fit_layer(
                layer.block,
                list(layer.experts.parameters()),
                fit,
                checked,
                steps=steps,
                learning_rate=learning_rate,
                batch_tokens=batch_tokens,
                eval_every=eval_every,
                proximal=proximal,
                generator=generator,
            )
        trace = {"layer": layer.layer_index, "experts": layer.num_experts, **trace}
        trace["accepted"] = trace["steps_kept"] > 0
        logger.info("Expert re-fit: %s", trace)
        layers.append(trace)

    try:
        report = prune_model(model, plan, moe, refit_layer)
    finally:
        model.train(training)
    return report, {
        "method": "refit_experts",
        "settings": {
            "steps": steps,
            "learning_rate": learning_rate,
            "batch_tokens": batch_tokens,
            "eval_every": eval_every,
            "proximal": proximal,
            "held_out": "batches" if held_out is not None else held_out_share,
            "seed": seed,
        },
        "tokens": tokens,
        "layers": layers,
        "seconds": round(time.monotonic() - started, 2),
    }


COMPENSATION_FILE = "compensation.json"  # its trace, beside a pruned checkpoint that was compensated

# A compensation as runs and sweeps apply it: it prunes (model, plan, its MoE structure or None) in place and
# returns the prune report and its trace.
Compensation = Callable[[nn.Module, PrunePlan, MoEModel | None], tuple[PruneReport, dict]]


def named_compensation(name: str, tokenizer, calibration, pruning) -> Compensation | None:
    """The compensation ``name`` (a recipe's ``compensation``, or a sweep method's; None for ``none``) with the
    recipe's settings (``pruning``: PruningArguments), on its calibration data."""
    if name == "none":
        return None
    return calibration_refit(tokenizer, calibration, pruning.sensitivity_examples, steps=pruning.refit_steps)


def prune_and_compensate(
    model: nn.Module, plan: PrunePlan, moe: MoEModel | None = None, compensation: Compensation | None = None
) -> tuple[PruneReport, dict | None]:
    """Prune ``model`` in place with ``plan``, through ``compensation`` when there is one; returns the prune report
    and the compensation's trace (None without one)."""
    if compensation is None:
        return prune_model(model, plan, moe), None
    return compensation(model, plan, moe)


def calibration_refit(tokenizer, calibration, examples: int, **settings) -> Compensation:
    """The ``refit`` compensation as a run or a sweep applies it, fitted on ``examples`` calibration sequences
    (those the sensitivity allocation measures on) and checked on as many held-out ones (those the search allocation
    scores on); ``settings`` go to :func:`prune_and_refit`."""
    batches = calibration_sample(tokenizer, calibration, examples)
    held_out = calibration_sample(tokenizer, calibration, examples, held_out=True)
    return functools.partial(prune_and_refit, batches=batches, held_out=held_out, **settings)
