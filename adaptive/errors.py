"""Errors a user can cause. Each prints as a clean message from the CLI (exit 2), never a traceback."""


class AdaptiveError(Exception):
    """Base of every user-facing error."""


class RecipeError(AdaptiveError):
    """A recipe failed validation. ``problems`` holds one ``dotted.path: what is wrong`` line each."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


class UnknownComponentError(AdaptiveError):
    """A recipe or call named a component that no loaded plugin registers."""


class PluginError(AdaptiveError):
    """A plugin failed to load or register (raised only in strict mode; otherwise a warning)."""


class DataError(AdaptiveError):
    """A corpus, tokenizer or data file is missing, empty or malformed."""


class CheckpointError(AdaptiveError):
    """A checkpoint or run directory is missing, incomplete or incompatible."""


class TrainingError(AdaptiveError):
    """Training cannot go on (a non-finite loss or gradient); the last good checkpoint is kept."""


class PluginWarning(UserWarning):
    """A plugin failed to load; the rest of the program goes on without it."""
