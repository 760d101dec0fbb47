"""The one base class for everything a user can cause: a bad flag, file or directory.

Each stage's main turns exactly a `UserError` into one line, `<stage>: <message>`, and exit code 1
(`dwjax.cli.user_errors`); anything else keeps its traceback, because it is a bug. Library code
raises the subclass that names the artifact at fault, so tests and notebooks can catch it narrowly.
"""
from __future__ import annotations


class UserError(Exception):
    """A one-line message the user can act on; it names the input and what is wrong with it."""


class ConfigError(UserError):
    """A flag or config value is out of range, of the wrong kind, or inconsistent with the run."""


class RunDirError(UserError):
    """The run directory is missing something, is corrupt, or belongs to another run."""


class CheckpointError(UserError):
    """A checkpoint file (torch/safetensors weights, or the run's own orbax checkpoint) is
    unreadable
    or does not fit."""
