"""DrPose: direct reward fine-tuning of multi-view human diffusion models on poses."""

__version__ = "0.1.0"
