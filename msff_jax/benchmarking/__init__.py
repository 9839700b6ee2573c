"""Pieces of the benchmark mode: timing, device peaks, and the files it writes.

`msff_jax.benchmark.run` composes them; each module here knows nothing of models,
configs or training, so each can be tested on its own.
"""
