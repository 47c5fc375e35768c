"""Errors that end a run, each with the exit code the CLI reports."""

from __future__ import annotations


class PipelineError(Exception):
    """A failure the user can act on; the CLI prints its message without a traceback."""

    exit_code = 1


class ConfigError(PipelineError):
    """The job cannot run as written: a bad field, missing shards, an unreachable store.

    Raised before any work starts, so nothing is half-written when it fires.
    """

    exit_code = 2
