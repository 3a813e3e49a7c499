"""What every entry point shares: argument parsing and the one way expected errors reach the user.

``moe-specialist <command>`` and ``python -m moe_specialist.train`` (also under ``accelerate launch``) print an
expected error (:class:`~moe_specialist.errors.MoESpecialistError`, or bad arguments) as one paragraph,
``moe-specialist <command>: error: <message>``, on stderr and exit with status 2; rank 0 alone prints it in a
distributed launch. ``--debug`` or ``MOE_SPECIALIST_DEBUG=1`` shows the traceback instead. Any other exception is a
bug or an environment failure and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from typing import NoReturn

from trl import TrlParser

from moe_specialist.errors import ConfigurationError, MissingInputError, MoESpecialistError

DEBUG_FLAG = "--debug"
DEBUG_ENV = "MOE_SPECIALIST_DEBUG"


class ArgumentParser(TrlParser):
    """``TrlParser`` whose errors are expected errors: no usage dump, no abbreviated flags (``--pruning_rat``)."""

    def __init__(self, dataclass_types, prog: str):
        super().__init__(dataclass_types, prog=prog, allow_abbrev=False)
        # This project's list-valued knobs take `--knob a b` and `--knob a,b` alike: argparse keeps the words and the
        # dataclass splits and converts them (configs.normalize_lists), with its own error messages.
        from moe_specialist.configs import own_list_fields

        own = {name for cls in self.dataclass_types for name in own_list_fields(cls)}
        for action in self._actions:
            if action.dest in own:
                action.type = str

    def error(self, message: str) -> NoReturn:
        raise ConfigurationError(f"{message} (see `{self.prog} --help`).")

    def parse(self, argv: Iterable[str] | None = None) -> tuple:
        """The dataclasses from ``--config FILE`` and flags; unknown keys and invalid values are expected errors."""
        argv = list(sys.argv[1:] if argv is None else argv)
        if "--config" in argv and argv.index("--config") + 1 < len(argv):
            config = argv[argv.index("--config") + 1]
            if not os.path.isfile(config):
                raise MissingInputError(f"No recipe file at {config}: check the --config path.")
        try:
            *parsed, from_config, from_flags = self.parse_args_and_config(
                args=argv, return_remaining_strings=True, separate_remaining_strings=True
            )
        except MoESpecialistError:
            raise
        except (ValueError, TypeError) as error:  # dataclass checks of transformers and TRL
            raise ConfigurationError(str(error)) from error
        if from_config:
            keys = ", ".join(str(key).removeprefix("--") for key in from_config[::2])
            raise ConfigurationError(f"Unknown recipe key(s) {keys}: remove them or fix their spelling.")
        if from_flags:
            raise ConfigurationError(
                f"Unknown argument(s) {' '.join(from_flags)}: flags are spelled out in full "
                f"(see `{self.prog} --help`)."
            )
        return tuple(parsed)


def command_name(command: str) -> str:
    return f"moe-specialist {command}"


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def run_entry_point(command: str, main: Callable[[list[str]], object], argv: list[str]) -> None:
    """Run ``main(argv)``; an expected error becomes one paragraph on stderr and exit status 2."""
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        main(argv)
    except MoESpecialistError as error:
        if debug:
            raise
        if _is_rank_zero():
            paragraph = " ".join(str(error).split())
            print(f"{command_name(command)}: error: {paragraph}", file=sys.stderr)
        raise SystemExit(2) from None
