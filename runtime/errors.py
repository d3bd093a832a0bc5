"""One exception tree for the whole toolchain.

Every message says what happened, why, and what to do. The CLI prints ``str(err)`` on one line
and exits with ``err.exit_code``; nothing else is caught.
"""

from __future__ import annotations


class VtcError(Exception):
    """Base of every error vtc raises on purpose. ``exit_code`` is the CLI's exit status."""

    exit_code = 1

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(f"{what} {fix}" if fix else what)


class UsageError(VtcError):
    """A command-line argument or option is invalid (bad ratio, unknown method, ...)."""

    exit_code = 2


class ModelError(VtcError):
    """The source checkpoint is missing, not a VLM, or of an unsupported architecture."""


class MethodError(UsageError):
    """A compression method or its options cannot be used as asked."""


class InputError(VtcError):
    """Bad runtime input: missing/corrupt image, prompt over the built text budget, ..."""


class ArtifactError(VtcError):
    """An artifact directory is incomplete, tampered with, or of an unsupported manifest version."""


class ExportError(VtcError):
    """Tracing or exporting a graph failed."""


class ParityError(VtcError):
    """An exported graph does not compute what its PyTorch source computes (beyond tolerance)."""


class BackendError(VtcError):
    """An inference backend is unavailable or failed (missing library, provider, device)."""
