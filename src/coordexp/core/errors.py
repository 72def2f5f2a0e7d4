"""The one base class of failures that are the user's situation, not a bug here.

Every error a user can fix (a wrong config key, a record that breaks the contract, an unusable COCO
file or checkpoint, an unreachable tracking server, a missing upstream output) is a
:class:`UserError`. The stage runner (:mod:`coordexp.pipeline.runner`) prints those as a single
``error: [stage] ...`` line and exits 2; anything else keeps its full traceback, because it is ours
to fix. Subclasses also derive from the builtin that describes them (``ValueError``,
``FileNotFoundError``), so callers that catch the builtin keep working.
"""


class UserError(Exception):
    """Something the user can fix: the message says what is wrong, where, and what to do."""


class StageError(UserError, RuntimeError):
    """A stage cannot go on: the message says why and what to do."""


class MissingInputError(UserError, FileNotFoundError):
    """An input a stage reads is missing: usually an upstream stage has not run yet."""
