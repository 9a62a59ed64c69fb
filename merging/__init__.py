"""coevo's weights layer; imports nothing else of coevo's.

- `merging.contract`: the merge-program contract, stated once;
- `merging.io`: safetensors I/O one tensor at a time (memory-mapped reads, atomic writes);
- `merging.check`: compatibility checks of a base model and its experts, from headers;
- `merging.methods`: the built-in merge methods (task arithmetic, TIES, DARE, Model Stock);
- `merging.apply`: `merge_models`, a merge function applied tensor by tensor.

The package itself imports nothing, so reading the contract does not import torch.
"""
