"""Evaluation of generated samples (ADM-format .npz)."""
