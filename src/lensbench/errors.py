"""The one exception type that reaches the user as a single line."""

from __future__ import annotations


class LensbenchError(Exception):
    """Bad input or an unmet precondition, reported as one line naming the field and the fix.

    ``field`` is the config path of the offending value (``model.init_args.models``), or ``None``
    when the problem is not tied to one field.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """A short hint listing close matches of ``name`` among ``choices`` (empty when none)."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    if choices:
        return "known: " + ", ".join(sorted(choices))
    return "none are registered"


class RunStopped(BaseException):
    """SIGTERM or SIGINT (Ctrl-C) received by ``lensbench``: raised where the run stands, so that it
    stops the way a failure does (shard closed, lock released, why logged) and ends in one line.
    A ``BaseException``, like ``KeyboardInterrupt``: no ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        self.signame = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signame}")
