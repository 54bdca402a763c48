"""Error hierarchy. Every user-facing error is a ``MergeError`` (a ``ValueError``)
whose message names the file, module or parameter at fault and, where there is
one, the fix."""


class MergeError(ValueError):
    """Base class of every error harness-merge raises for bad input."""


class InputError(MergeError):
    """An adapter folder, checkpoint or base model cannot be read or does not fit."""


class MethodParamError(MergeError):
    """An unknown method, an unknown parameter or a value out of range."""


class ArtifactError(MergeError):
    """The output folder cannot be written (exists and is not ours, ...)."""
