"""The models: Flax decoders that read their adapters from a separate "lora" collection.

family.py      Family: what jlora needs to know of a model family (its config, parameter shapes, adaptable
               modules, Hugging Face names); FAMILIES and family_of, the one place a family plugs in
gpt2.py        GPT-2 (Hugging Face's parameter names, Conv1D layout) with a KV cache for decoding
llama.py       the Llama family (Llama, SmolLM2, Qwen2, Mistral): RMSNorm, SwiGLU, grouped-query attention
decoder.py     what both decoders share: causal attention, the KV cache's masks, token-id checks
rotary.py      rotary position embeddings (RoPE, with Llama 3's frequency scaling)
linear.py      Linear: the one adapted layer (plain, DoRA, q/k/v slices, a stack of members or of rows)
dropout.py     dropout masks from a counter hash of the key
"""
