"""Expected errors: bad input or a state the user can fix, reported as one paragraph without a traceback.

Every error the library raises on purpose derives from :class:`MoESpecialistError`; the entry points
(``moe-specialist <command>``, ``python -m moe_specialist.train``) print it as ``moe-specialist <command>: error:
<message>`` on stderr and exit with status 2. Anything else is a bug or an environment failure and keeps its
traceback. The subclasses also derive from the matching built-in exception, so ``except ValueError`` still works.
"""

from __future__ import annotations


class MoESpecialistError(Exception):
    """Base of every expected error: the message names the problem and the fix."""


class ConfigurationError(MoESpecialistError, ValueError):
    """Arguments, recipes, plans, statistics or data that cannot be used as given."""


class MissingInputError(MoESpecialistError, FileNotFoundError):
    """An input file, directory or model that does not exist."""


class OutputExistsError(MoESpecialistError, FileExistsError):
    """An output that exists already and would be replaced without ``--overwrite``."""


class UnsafePathError(ConfigurationError):
    """A name read from an untrusted file (a checkpoint index, a plan, a statistics file) that leaves its directory."""


class LaunchError(MoESpecialistError, RuntimeError):
    """A distributed or training setup that would silently do the wrong thing."""
