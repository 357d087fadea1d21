"""Decoding: batched generation with a KV cache in one compiled loop.

generate.py    prefill and greedy / sampled decoding; one adapter, or a mixed batch of several
"""
