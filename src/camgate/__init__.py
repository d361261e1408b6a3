"""camgate: heatmap test gates for vision models."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("camgate")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"
