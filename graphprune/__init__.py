"""graphprune: structured pruning of hybrid Mamba2/attention language models as graph rewrites."""

from .api import Analysis, analyze
from .trace import load_model, trace

__all__ = ["Analysis", "analyze", "load_model", "trace"]
__version__ = "0.1.0"
