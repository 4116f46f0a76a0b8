"""Error types. The CLI turns every `SftError` into one line and a non-zero exit."""

from __future__ import annotations


class SftError(Exception):
    """An error the user can act on. `exit_code` is what the CLI exits with.

    ``same_in_every_process``: every process of a distributed run meets it at the same point
    with the same message, so only the main process prints it (the others exit quietly).
    """

    exit_code = 1
    same_in_every_process = False


class UsageError(SftError):
    """Bad command line or configuration (exit code 2, like click's own usage errors)."""

    exit_code = 2


class UnknownComponentError(UsageError):
    """A component name no plugin registered."""


class PluginError(SftError):
    """A plugin failed to load or registered something invalid."""


class DataError(SftError):
    """A problem in the training data, located by file, row and field."""

    def __init__(
        self,
        path: str,
        row: int | None,
        field: str | None,
        message: str,
        *,
        reason: str = "bad-row",
        unit: str = "row",
    ):
        self.path, self.row, self.field, self.message, self.reason = path, row, field, message, reason
        where = str(path)
        if row is not None:
            where += f", {unit} {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


class RowDropped(Exception):
    """Raised by a masker for a row it cannot train on; `reason` is a short slug that summaries count.

    Not an error: the pipeline counts dropped rows per reason and goes on.
    """

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class FieldError(ValueError):
    """Raised by a template for a row whose ``field`` is missing, of the wrong type or empty.

    The host adds the file and row and reports it as a `DataError` (or skips the row under
    ``--on-bad-row skip``, counting ``reason``).
    """

    def __init__(self, field: str, message: str, *, reason: str):
        self.field, self.message, self.reason = field, message, reason
        super().__init__(f"field '{field}': {message}")


def one_line(exc: BaseException) -> str:
    """An error's reason in one line: its strerror, or its text with the lines joined
    (transformers' OSErrors and ValueErrors run to several)."""
    text = getattr(exc, "strerror", None) or str(exc)
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__
