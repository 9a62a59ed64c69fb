"""The merge-program contract, stated once.

A merge program (generated, a built-in method, or a population child) defines

    def merge(task_vectors, *, name, base):

`task_vectors[i]` is expert i's weights minus the base's for the parameter called `name`, and
`base` the base's weights for it, all float32 tensors of one shape, on the merge's device (the
CPU, or a GPU when the sandbox has one). It returns the merged task vector, a floating-point
tensor of that shape; the engine (`merging.apply`) writes `base + merged` for every parameter
into a standard Hugging Face model dir. The inputs are read-only: writing into them is an
invalid output.

The static policy (`sandbox.policy`), the harness, the built-in methods, the generator's
corpus and the population operators all take the names below from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the contract's names are read where torch is not imported (the policy)
    import torch

FUNCTION = "merge"
# The positional parameter (its name is free: callers pass it by position) and the
# keyword-only parameters (fixed names).
POSITIONAL = ("task_vectors",)
KEYWORD_ONLY = ("name", "base")
SIGNATURE = f"def {FUNCTION}({', '.join(POSITIONAL)}, *, {', '.join(KEYWORD_ONLY)})"
# How a program starts: the only import it needs, then the contract's function.
PROGRAM_HEADER = f"import torch\n\n\n{SIGNATURE}:\n"


class MergeFn(Protocol):
    """A function with the contract's signature."""

    def __call__(
        self, task_vectors: list[torch.Tensor], *, name: str, base: torch.Tensor
    ) -> torch.Tensor: ...


# A merge function whose attribute of this name is True computes every value of its result
# from the inputs' values at the same position only (task arithmetic, not TIES's top-k): the
# engine may then call it on 1-D chunks of a parameter (`merging.apply`), which keeps the
# float32 arithmetic in cache. The built-in methods say so where it holds.
ELEMENTWISE = "elementwise"
