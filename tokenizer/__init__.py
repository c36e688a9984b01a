"""LlamaGen-compatible VQ tokenizer (VQ-16, VQ-8), image transforms and a tokenizer trainer."""
