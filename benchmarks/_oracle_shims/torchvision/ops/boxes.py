"""Greedy NMS with torchvision semantics, in plain torch.

torchvision.ops.nms: boxes (x1, y1, x2, y2), area (x2 - x1) * (y2 - y1) without +1, boxes taken
in descending score order (stable for ties), a box is dropped when its IoU with an already kept
box is strictly greater than the threshold; the kept indices come back in descending score order.
batched_nms runs that independently per index (torchvision's "vanilla" path) and returns all
kept indices sorted by descending score.
"""

import torch


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Returns the int64 indices kept by greedy NMS, in descending score order."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    order = torch.sort(scores, descending=True, stable=True).indices
    suppressed = torch.zeros(len(scores), dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        xx1 = torch.maximum(x1[i], x1)
        yy1 = torch.maximum(y1[i], y1)
        xx2 = torch.minimum(x2[i], x2)
        yy2 = torch.minimum(y2[i], y2)
        inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
        iou = inter / (areas[i] + areas - inter)
        suppressed |= iou > iou_threshold
    return torch.as_tensor(keep, dtype=torch.int64, device=boxes.device)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """Returns the indices kept by NMS run separately per value of `idxs`, by descending score."""
    keep = torch.zeros(len(scores), dtype=torch.bool)
    for idx in torch.unique(idxs).tolist():
        members = torch.where(idxs == idx)[0]
        keep[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    kept = torch.where(keep)[0]
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]
