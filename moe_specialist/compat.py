"""Every use of a private transformers / TRL internal, in one place, each pinned by a test in tests/test_compat.py.

When an upgrade moves one of these, that test fails with a message naming the internal, instead of a run going
silently wrong.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

from torch import nn


def original_key_names(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """The checkpoint (original-format) name of each in-memory parameter name, e.g. Mixtral's ``mlp.gate`` is saved
    as ``block_sparse_moe.gate``. Only renamings are meaningful here; the model may be on the meta device.
    """
    from transformers.core_model_loading import revert_weight_conversion

    params = dict(model.named_parameters())
    mapping = {}
    for name in names:
        (original,) = revert_weight_conversion(model, {name: params[name]}).keys()
        mapping[name] = original
    return mapping


@contextmanager
def zero3_init_disabled():
    """Load whole models even when a ZeRO-3 config is active (``zero3_init_flag: true``).

    transformers enters ``deepspeed.zero.Init`` in ``from_pretrained`` whenever its global DeepSpeed config says
    stage 3, which the ``SFTConfig`` sets up as soon as it is parsed; the model would then be partitioned before it
    could be calibrated or pruned. transformers has no public switch for one call, so its reference is cleared and
    restored around the load.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def log_as_evaluation(trainer, logs: dict[str, float]) -> None:
    """``trainer.log(logs)`` as an evaluation entry.

    ``SFTTrainer.log`` folds its pending metrics of the current mode (train or eval, read from ``model.training``)
    into every entry: logged in train mode, translation scores would carry (and reset) the running training
    metrics. The model is put in eval mode for the call, the only switch TRL offers.
    """
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        trainer.log(logs)
    finally:
        model.train(was_training)


def causal_lm_class_for(config) -> type | None:
    """The causal-LM class transformers maps ``config``'s type to (None when there is none), without building a model:
    ``AutoModelForCausalLM.from_config`` would instantiate one."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping.get(type(config), None)


def experts_implementation(model) -> str:
    """The experts implementation ``model`` runs (``set_experts_implementation`` has no public getter)."""
    return model.config._experts_implementation


def load_balancing_loss(config, router_logits, attention_mask):
    """transformers' router load-balancing loss (Mixtral's function, which every MoE family reuses), as the model's
    own forward adds it; computed here for the compact LM head of :mod:`moe_specialist.training.recovery`."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    experts = router_logits[0].shape[-1]  # one count per model: the aux loss is off for uneven plans
    top_k = config.get_text_config().num_experts_per_tok
    return load_balancing_loss_func(router_logits, experts, top_k, attention_mask)


def trainer_metrics(trainer, mode: str) -> dict[str, list[float]]:
    """The lists ``SFTTrainer.log`` averages into each log entry of ``mode`` ("train" or "eval") and then clears;
    TRL has no public way to add a metric."""
    return trainer._metrics[mode]


def transformers_mxfp4_dequantize(blocks, scales, dtype):
    """transformers' own dequantization of GPT-OSS's MXFP4 expert tensors (what a load with
    ``Mxfp4Config(dequantize=True)`` runs): the reference :func:`moe_specialist.mxfp4.dequantize_mxfp4` must equal
    bit for bit, kept callable here so that a change on either side shows."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=dtype)


@contextmanager
def saved_without_quantized_loading(model: nn.Module):
    """Within the block, ``model.save_pretrained`` writes the architecture's unquantized original format even when
    transformers dequantized ``model`` from an MXFP4 or FP8 checkpoint while loading it.

    ``save_pretrained`` writes a model through the reverse of the conversions it was loaded with
    (``model._weight_conversions``), the dequantizing ones included, although the dequantized model no longer has a
    quantizer or a ``quantization_config``: transformers 5.23 then writes GPT-OSS's bf16 experts under the MXFP4
    names (``*_blocks``, no ``*_scales``), which reload as missing and randomly initialised, and fails on
    DeepSeek-V3's FP8 ("Undefined Operation encountered!"). Those conversions are set aside for the block, so that
    transformers falls back to the architecture's own (as for a model built from a config).
    """
    conversions = getattr(model, "_weight_conversions", None)
    dequantized = not getattr(model, "is_quantized", False) and any(
        type(operation).__name__.endswith("Dequantize")
        for conversion in conversions or ()
        for operation in getattr(conversion, "operations", ())
    )
    if dequantized:
        model._weight_conversions = None
    try:
        yield
    finally:
        if dequantized:
            model._weight_conversions = conversions
