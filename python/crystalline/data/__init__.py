"""The data pipeline: corpus walking, the byte-level BPE tokenizer, prepared
token datasets (`crystalline prepare`), model-size advice and the statistics
of `tokenize --stats` and `crystalline size`."""
