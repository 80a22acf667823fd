"""adapterhub-c: run many LoRA adapters on compressed models."""
__version__ = "0.1.0"
