"""The data pipeline: corpus walking, the byte-level BPE tokenizer, prepared
token datasets (`crystalline prepare`) and model-size advice (`crystalline size`)."""
