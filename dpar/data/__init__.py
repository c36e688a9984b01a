"""Data: image folders, the synthetic dataset, the token store, preprocessing, datasets and packing."""
