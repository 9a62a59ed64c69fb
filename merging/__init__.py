"""coevo's weights layer; imports nothing else of coevo's.

- `merging.contract`: the merge-program contract, stated once;
- `merging.io`: reading safetensors one tensor at a time (memory-mapped, zero-copy views);
- `merging.writer`: writing model dirs as tensors are produced (streamed shards, atomic);
- `merging.check`: compatibility checks of a base model and its experts, from headers;
- `merging.methods`: the built-in merge methods (task arithmetic, TIES, DARE, Model Stock);
- `merging.apply`: `merge_models`, a merge function applied tensor by tensor (CPU or CUDA).

The package itself imports nothing, so reading the contract does not import torch.
"""
