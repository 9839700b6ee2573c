"""DeepFashion parsing, TFRecord shards and the grain input pipeline.

Knows nothing of models; see ARCHITECTURE.md for the shard and reader contracts.
"""
