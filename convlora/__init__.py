"""convlora: convolutional and diffusion LoRA with exact merge-on-eval."""

__version__ = "0.1.0"
