"""Prune a mixture-of-experts LLM into a translation specialist, then recover it with a short SFT.

Usage (one recipe = one run; any recipe key can be overridden on the command line):

    ACCELERATE_LOG_LEVEL=info accelerate launch --config_file accelerate_configs/zero3.yaml \\
        -m moe_specialist.train --config recipes/qwen3-30b-a3b/en-de/prune_sft.yaml --pruning_ratio 0.75 \\
        --output_dir outputs/qwen3-30b-a3b/en-de/prune_sft-r0.75

On CPU (the demo generalist; two processes, DDP on gloo or DeepSpeed ZeRO-2/3):

    accelerate launch --config_file accelerate_configs/cpu/ddp.yaml \\
        -m moe_specialist.train --config recipes/demo/en-fr/prune_sft.yaml --pruning_ratio 0.75 \\
        --output_dir outputs/demo/en-fr/prune_sft-r0.75

or in one process: ``python -m moe_specialist.train --config recipes/demo/en-fr/prune.yaml``. See recipes/README.md
for every recipe and its accelerate config. Outputs in ``output_dir`` (an existing non-empty one is refused unless
``--overwrite_output_dir true`` or ``--resume_from_checkpoint true``): ``model/`` (the pruned, fine-tuned checkpoint
with its model card and ``prune_plan.json``), ``results.json``, ``translations.json``, ``prune_plan.json``,
``trainer_state.json``, ``checkpoint-*/``, ``ranks/`` (each rank's expert shapes and checksums), ``wandb/``.
Bad input is reported as ``moe-specialist train: error: ...`` (exit status 2); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys

# huggingface_hub reads these once, when it is imported (a recipe's `env:` block comes too late for them)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import datasets  # noqa: E402
import transformers  # noqa: E402
from accelerate import PartialState  # noqa: E402

from moe_specialist.entry import run_entry_point  # noqa: E402
from moe_specialist.training.pipeline import parse_recipe, run  # noqa: E402
from moe_specialist.training.progressive import run_progressive  # noqa: E402
from moe_specialist.training.wandb_logging import shut_down_wandb  # noqa: E402

logger = logging.getLogger("moe_specialist")


def main(model_args, data_args, calibration_args, pruning_args, training_args) -> dict:
    ###############
    # Setup logging
    ###############
    log_level = training_args.get_process_log_level()
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    logging.getLogger("moe_specialist").setLevel(logging.INFO if training_args.should_log else log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()

    logger.info(f"Model parameters {model_args}")
    logger.info(f"Data parameters {data_args}")
    logger.info(f"Calibration parameters {calibration_args}")
    logger.info(f"Pruning parameters {pruning_args}")
    logger.info(f"Training parameters {training_args}")

    ###########################################################
    # Calibrate, prune, fine-tune, evaluate, save (one process
    # per rank; see moe_specialist/training/pipeline.py)
    ###########################################################
    stages = run_progressive if training_args.progressive_ratios else run
    results = stages(model_args, data_args, calibration_args, pruning_args, training_args)

    ##########
    # Summary
    ##########
    state = PartialState()
    if state.is_main_process:
        end = (results["scores"] or {}).get("end")
        if end:
            logger.info(
                "Final chrF++ %s (avg %.2f); model in %s",
                {name: d["chrf++"] for name, d in end["directions"].items()},
                end["average"]["chrf++"],
                results["model_dir"],
            )
    shut_down_wandb()
    state.destroy_process_group()
    return results


def cli(argv: list[str]) -> None:
    main(*parse_recipe(argv))


if __name__ == "__main__":
    run_entry_point("train", cli, sys.argv[1:])
