"""Data: tokenizers (bytes, byte-level BPE), corpora with domain labels, prepared MindRecord shards, and the
training/eval batch pipelines."""
