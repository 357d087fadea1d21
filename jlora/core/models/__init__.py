"""The models: Flax decoders that read their adapters from a separate "lora" collection.

gpt2.py        GPT-2 (Hugging Face's parameter names, Conv1D layout) with a KV cache for decoding
dropout.py     dropout masks from a counter hash of the key
"""
