"""The one base class of failures that are the user's situation, not a bug here.

Stage scripts print these as a single ``error: [stage] ...`` line and exit 2 (see
:mod:`coordexp.stage`); anything else keeps its traceback, because it is ours to fix.
"""


class StageError(RuntimeError):
    """A stage cannot go on: the message says why and what to do."""
