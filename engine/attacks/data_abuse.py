"""Data abuse: can a recogniser still use what a protection released? (PMT's Eq. 10.)

    Acc = (1 / N) sum_i [ cos(F(x~_i), F(x_i)) > kappa ]        (kappa = 0.2 by default)

over N protected faces x~_i and their originals x_i, for F an authorised recogniser (finishing
its embedding from the released shallow features) or an unauthorised one (the full model on
the protected image). Cosines are taken after subtracting `centre`, the mean embedding of a
reference set of clean faces: dlib's descriptors all lie in one narrow cone (raw cosine 0.83 on
average between different people of the shared photos, 0.93-0.97 for the same person), where a
fixed kappa would call every pair a match; centred, the same pairs average 0.64 and different
people -0.13, as with FaceNet. `verification` gives the clean baseline on pairs of different
photos of one person.
"""

from __future__ import annotations

import numpy as np


def centred_cosine(a: np.ndarray, b: np.ndarray, centre: np.ndarray | None) -> np.ndarray:
    """Returns [N] cos(a_i - centre, b_i - centre) of embeddings [N, D]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if centre is not None:
        a, b = a - centre, b - centre
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    return np.sum(a * b, axis=-1) / np.maximum(na * nb, 1e-12)


def match_accuracy(protected: np.ndarray, clean: np.ndarray, *, kappa: float = 0.2,
                   centre: np.ndarray | None = None) -> float:
    """Returns Eq. 10's accuracy: the fraction of protected faces matching their original."""
    return float(np.mean(centred_cosine(protected, clean, centre) > kappa))


def same_person_pairs(identities) -> tuple[np.ndarray, np.ndarray]:
    """Returns (i, j) index arrays of every pair of different photos of one identity."""
    ids = np.asarray(identities)
    i, j = np.triu_indices(len(ids), 1)
    keep = ids[i] == ids[j]
    return i[keep], j[keep]


def verification(embeddings: np.ndarray, identities, *, kappa: float = 0.2,
                 centre: np.ndarray | None = None) -> float:
    """Returns the fraction of same-person photo pairs whose centred cosine exceeds kappa."""
    i, j = same_person_pairs(identities)
    if not len(i):
        return float("nan")
    e = np.asarray(embeddings)
    return float(np.mean(centred_cosine(e[i], e[j], centre) > kappa))
