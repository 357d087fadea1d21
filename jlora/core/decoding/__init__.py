"""Decoding: batched generation with a KV cache in one compiled loop.

generate.py    prefill and greedy / sampled decoding; one adapter, or a mixed batch of several
beam.py        beam search as transformers' generate(num_beams=K) does it, the cache's rows B x K
processors.py  the repetition penalty and no repeated n-gram, over each row's real tokens
"""
