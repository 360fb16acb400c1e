"""rkif: continual learning of language models (Recurrent-KIF and its baselines)."""

__version__ = "0.1.0"
