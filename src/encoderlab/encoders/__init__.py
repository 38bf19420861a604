"""Encoders: one contract, one registry, adapters for transformers, open_clip, packaged and local models."""

from .base import Encoder, EncoderInfo, FeatureSource, ImageTransform, select_device, select_precision
from .registry import (
    create_encoder,
    list_encoders,
    parse_spec,
    register_encoder,
    register_prefix,
    unregister_encoder,
)

__all__ = [
    "Encoder",
    "EncoderInfo",
    "FeatureSource",
    "ImageTransform",
    "create_encoder",
    "list_encoders",
    "parse_spec",
    "register_encoder",
    "register_prefix",
    "select_device",
    "select_precision",
    "unregister_encoder",
]
