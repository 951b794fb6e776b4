"""expertkit: one base model -> a library of LoRA domain experts, composed, measured and served."""

from expertkit.errors import ExpertkitError

__version__ = "0.1.0"
__all__ = ["ExpertkitError", "__version__"]
