"""Errors that the CLI turns into one-line messages with exit code 2."""


class CLToolboxError(Exception):
    """Base class for user-facing errors: the message names the field and the fix."""


class ConfigError(CLToolboxError):
    """An invalid experiment config (unknown key, wrong type, impossible value)."""


class DataMissingError(CLToolboxError):
    """Dataset files are not on disk at the configured root."""


class RunExistsError(CLToolboxError):
    """A finished run folder already exists and would be overwritten."""


class DivergenceError(CLToolboxError):
    """Training produced a NaN or infinite loss."""


class RunLockedError(RunExistsError):
    """Another live process holds the run folder's lock."""


class PluginError(CLToolboxError):
    """A plugin's code breaks the plugin contract (a misspelled hook, a taken name, an untyped parameter)."""


def one_line(e: BaseException) -> str:
    """``SyntaxError: invalid syntax (line 2)`` or ``ValueError: boom``: an exception on one line."""
    if isinstance(e, SyntaxError):
        return f"SyntaxError: {e.msg} (line {e.lineno})"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
