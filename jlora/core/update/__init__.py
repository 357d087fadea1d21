"""The training update: loss, optimizer, one compiled step, and many adapters in one step.

loss.py        masked next-token cross-entropy, the head only where the loss is
optim.py       the trainable mask, partition / combine, AdamW (+ LoRA+)
step.py        the train and evaluation steps, jit-compiled over a mesh
mesh.py        the device mesh (member, data, fsdp) and what lives where on it; multi-host start
population.py  many adapters on one base, stacked, trained by one vmapped step
probes.py      what an init reads from the first batches: layer inputs (EVA), averaged weight gradients (LoRA-GA)
"""
