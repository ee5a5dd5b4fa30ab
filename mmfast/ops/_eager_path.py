"""When an op may skip its torch.library custom op and call its face through a plain
``torch.autograd.Function``.

torch.library's custom-op call costs tens of microseconds of Python per call (argument defaults,
pytree flattening of the autograd registration): ~35 us without grad to ~115 us with grad for
attention, ~130 us for concat_embed's forward on this CPU, against ~15 us for an
autograd.Function. At the zoo's tiny sizes that is more than the kernels themselves. The custom
op stays the path whenever anything but eager autograd looks at the call: torch.compile, tensor
subclasses (FakeTensor, DTensor), torch-function / dispatch modes and functorch transforms.
"""

from __future__ import annotations

import torch
from torch import Tensor


_PLAIN = (Tensor, torch.nn.Parameter)  # exact types: a subclass may carry its own __torch_function__


def plain_eager(*tensors) -> bool:
    """True when nothing but eager autograd will see a call with these tensors (None allowed)."""
    return (not torch.compiler.is_compiling()
            and all(t is None or type(t) in _PLAIN for t in tensors)
            and not torch._C._is_torch_function_mode_enabled()
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._are_functorch_transforms_active())
