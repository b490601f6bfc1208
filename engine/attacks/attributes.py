"""Attribute estimation: does a protected face still give away age and gender? (PMT's suite.)

The attacker runs the age and gender networks (`faceveil.models.attributes`) on the original
face and on the protected one and compares what they say, per face:

    cosine        cos(v(x), v(x~)) of the raw output vectors v (81 age class probabilities,
                  then P(female), P(male)); non-negative, 1 when the outputs are the same
    age_error     |age(x) - age(x~)| in years (expected ages)
    gender_agree  P(male) on the same side of 0.5 for both

A protection hides the attributes when the cosine falls and the age error grows; gender
agreement near 0.5 over many faces is chance. Inputs are chips aligned to dlib's face template
(the "dlib" recogniser's 150 x 150 chips, padding 0.25), whatever method produced them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from faceveil.models import attributes as attribute_models


@dataclasses.dataclass(frozen=True)
class AttributeResult:
    """What the attribute attacker reads from N original faces and their protected versions."""

    original: attribute_models.Attributes  # on the original chips
    protected: attribute_models.Attributes  # on the protected chips
    cosine: np.ndarray  # [N] float64 cos of the attribute vectors, in [0, 1]
    age_error: np.ndarray  # [N] float64 |age_o - age_p| in years
    gender_agree: np.ndarray  # [N] bool, the same predicted gender

    @property
    def mean_cosine(self) -> float:
        """Returns the mean attribute-vector cosine (NaN for no face)."""
        return _mean(self.cosine)

    @property
    def mean_age_error(self) -> float:
        """Returns the mean age error in years (NaN for no face)."""
        return _mean(self.age_error)

    @property
    def gender_agreement(self) -> float:
        """Returns the fraction of faces whose predicted gender is unchanged (NaN for none)."""
        return _mean(self.gender_agree)

    def summary(self) -> dict:
        """Returns the JSON form: means over the faces and the per-face values."""
        return {
            "faces": len(self.cosine),
            "mean_cosine": self.mean_cosine,
            "mean_age_error": self.mean_age_error,
            "max_age_error": float(self.age_error.max()) if len(self.age_error) else None,
            "gender_agreement": self.gender_agreement,
            "per_face": [
                {"age_original": float(ao), "age_protected": float(ap),
                 "p_male_original": float(go), "p_male_protected": float(gp),
                 "cosine": float(c), "age_error": float(e), "gender_agree": bool(g)}
                for ao, ap, go, gp, c, e, g in zip(
                    self.original.age, self.protected.age, self.original.gender_prob,
                    self.protected.gender_prob, self.cosine, self.age_error, self.gender_agree)],
        }


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def compare(original: attribute_models.Attributes,
            protected: attribute_models.Attributes) -> AttributeResult:
    """Returns the AttributeResult of two Attributes of the same N faces."""
    a = np.asarray(original.vector, np.float64)
    b = np.asarray(protected.vector, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"attributes of {a.shape[0]} and {b.shape[0]} faces: not paired")
    cos = np.sum(a * b, axis=-1) / np.maximum(
        np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
    cos = np.clip(cos, 0.0, 1.0)  # probabilities: never negative; rounding can pass 1
    return AttributeResult(
        original=original, protected=protected, cosine=cos,
        age_error=np.abs(np.asarray(original.age, np.float64)
                         - np.asarray(protected.age, np.float64)),
        gender_agree=np.asarray(original.male) == np.asarray(protected.male))


def evaluate(model: attribute_models.AttributeModel, originals, protected) -> AttributeResult:
    """Returns the AttributeResult of protected chips against their originals.

    Args:
      model: the age and gender networks (`faceveil.models.attributes.load()`).
      originals: [N, S, S, 3] float chips in [0, 1] aligned to dlib's template (padding 0.25).
      protected: the protected faces' chips, the same shape (any method's output).
    """
    originals, protected = np.asarray(originals), np.asarray(protected)
    if originals.shape != protected.shape:
        raise ValueError(f"originals {originals.shape} and protected {protected.shape} chips "
                         "differ in shape")
    if not len(originals):
        empty = attribute_models.Attributes(
            age=np.zeros(0, np.float32), gender_prob=np.zeros(0, np.float32),
            vector=np.zeros((0, attribute_models.VECTOR_SIZE), np.float32))
        return compare(empty, empty)
    return compare(model.predict(originals), model.predict(protected))
