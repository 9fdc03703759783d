"""tinyclip: CLIP and SigLIP from scratch on NumPy and CuPy, with a hand-written autograd.

    import tinyclip as tc
    x = tc.tensor([[1.0, 2.0]], requires_grad=True)
    (x * x).sum().backward()      # x.grad == 2 x
"""

__version__ = "0.1.0"

from . import (backend, autograd, functional, nn, optim, losses, models, tokenizer, checkpoint, data,
               distributed, evaluate, plots, hub)
from .autograd import Tensor, Function, no_grad, enable_grad, is_grad_enabled, tensor

__all__ = ["Tensor", "Function", "tensor", "no_grad", "enable_grad", "is_grad_enabled",
           "backend", "autograd", "functional", "nn", "optim", "losses", "models", "tokenizer", "checkpoint", "data",
           "distributed", "evaluate", "plots", "hub", "__version__"]
