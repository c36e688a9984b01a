"""LlamaGen-compatible VQ tokenizer (VQ-16, VQ-8) and image transforms; arrives with issue 3."""
