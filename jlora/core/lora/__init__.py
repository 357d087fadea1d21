"""The LoRA maths: what an adapter is and what can be computed from it, with no model in sight.

config.py      LoraConfig: targets, ranks, alpha, the scaling alpha / r (rsLoRA: alpha / sqrt(r)), effective lr
adapter.py     the adapter tree {"A": (r, d_in), "B": (d_out, r)} per module: its layout, init and update
dora.py        DoRA: the magnitude m and the column norm ||W + s B A||, from the factors
residual.py    PiSSA / OLoRA: A, B from W's SVD / QR on a residual base; conversion to plain LoRA
eva.py         EVA: an incremental PCA of the layers' inputs, the rank budget redistributed by explained variance
lora_ga.py     LoRA-GA: A, B from the SVD of the averaged weight gradient, on a residual base
adalora.py     AdaLoRA: the SVD-shaped adapter, its orthogonality penalty and budget allocator (optax)
merge.py       W' = W + scaling * B A and back
svd.py         the spectrum of dW from its factors, subspace similarity, truncation, intruders
counting.py    parameter counts
"""
