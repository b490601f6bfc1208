"""torchvision.transforms.functional stand-in: `to_tensor` for numpy HWC arrays."""

import numpy as np
import torch


def to_tensor(pic) -> torch.Tensor:
    """Returns a CHW float tensor from an HWC array (uint8 scaled to [0, 1], floats unchanged)."""
    arr = np.asarray(pic)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    return t.float().div(255) if t.dtype == torch.uint8 else t
