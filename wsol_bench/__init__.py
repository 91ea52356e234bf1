"""wsol-bench: explain Vision Transformers and score the explanations as weakly-supervised
object localization and faithfulness."""

__version__ = "0.1.0"
