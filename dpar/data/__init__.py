"""Data: image folders for the tokenizer; token stores, datasets and packing arrive with issue 4."""
