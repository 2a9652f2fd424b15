"""Data: byte tokenizer, corpora with domain labels, and the training/eval batch pipelines."""
