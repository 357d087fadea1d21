"""Adapters as values: combining several into one, and many answering one batch side by side.

task_vectors.py  merging task tensors: task arithmetic, TIES, DARE, magnitude pruning (PEFT's merge_utils)
combine.py       one adapter from several, every PEFT combination type (combine_adapters)
mixed.py         K adapters stacked over one base, each row of a batch answered by its own
"""
