"""Errors gemmguard raises on purpose; each message says what happened, why, and what to do.

    GemmguardError
    ├── UsageError          bad option or input from the user
    ├── ConfigError         a GEMMGUARD_* variable has a bad value
    ├── ServeError          the server cannot start (model path, port, engine)
    └── SelfcheckFailed     a kernel failed the start-up self-check and the policy refuses it
"""

from __future__ import annotations


class GemmguardError(Exception):
    """Base of every error gemmguard raises on purpose."""


class UsageError(GemmguardError):
    """A command-line option or input the user gave is not valid."""


class ConfigError(GemmguardError):
    """A GEMMGUARD_* environment variable has a value that cannot be used."""


class ServeError(GemmguardError):
    """`gemmguard serve` cannot start the server."""


class SelfcheckFailed(GemmguardError):
    """A layer's kernel failed the start-up self-check and the policy does not serve it."""
