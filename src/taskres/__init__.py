"""taskres: Task Residual tuning of CLIP-style vision-language models on cached features."""

__version__ = "0.1.0"
