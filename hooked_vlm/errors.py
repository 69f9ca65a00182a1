"""Error types whose messages name the problem and the fix."""


class InputError(ValueError):
    """The inputs do not describe a valid forward for this model (counts, shapes, dtypes, devices)."""


class UnsupportedModelError(ValueError):
    """A checkpoint or in-memory model whose architecture hooked_vlm does not reimplement."""


class CheckpointError(FileNotFoundError):
    """A checkpoint folder without the files it needs (config.json, weights)."""
