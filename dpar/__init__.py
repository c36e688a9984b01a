"""DPAR: dynamic patchification for efficient autoregressive image generation."""
