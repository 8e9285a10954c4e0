"""Errors a user can cause and fix. The CLI prints them as one line; the server maps them to 400s."""


class RvllmError(Exception):
    """Base class: a problem with what the user asked for, not a bug in rvllm."""


class ModelLoadError(RvllmError):
    """A model directory or file that cannot be loaded; the message names the file and the problem."""


class DeviceError(RvllmError):
    """The requested device is not usable (e.g. --device cuda without a GPU)."""
