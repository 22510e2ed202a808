"""One exception family for the whole pipeline.

Every message says what is wrong, what was expected and what to do. The stage runners catch
:class:`PipelineError` per slide and record ``str(exc)`` as the one-line reason in status.csv.
"""


class PipelineError(Exception):
    """Base class of every error wsi-pipeline raises on purpose."""


class ConfigError(PipelineError, ValueError):
    """A configuration value or command-line parameter is invalid."""


class ManifestError(PipelineError, ValueError):
    """The slide manifest has problems (the message lists every row at fault)."""


class SlideError(PipelineError):
    """A slide cannot be opened, read or resolved (no mpp, corrupt tiles, ...)."""


class BagError(PipelineError):
    """A feature bag or coordinates file is missing, corrupt or inconsistent."""


class CheckpointError(PipelineError):
    """A model checkpoint or experiment folder is missing or does not match the request."""
