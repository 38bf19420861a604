"""encoderlab: measure how much adaptation a pretrained vision or text encoder needs, then do it."""

__version__ = "0.1.0"
