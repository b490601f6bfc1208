"""`faceveil compare`: distance between the largest faces of two photos, and the decision."""

from __future__ import annotations

import numpy as np

from faceveil.engine.pipeline import image_io, recognise


def compare_files(path_a: str, path_b: str, *, model: str = "dlib") -> dict:
    """Returns {distance, threshold, same, model, faces} for the largest face of each photo."""
    from faceveil.models import registry

    rec = registry.get(model)
    embs, faces = [], []
    for path in (path_a, path_b):
        image = image_io.read_image(path)
        box, lms, score = recognise.largest_face(image, source=path)
        emb, _ = recognise.embed_faces(image, lms[None], model)
        embs.append(emb[0])
        faces.append({"file": str(path), "box": [round(float(v), 1) for v in box],
                      "score": round(score, 4)})
    distance = float(np.linalg.norm(embs[0] - embs[1]))
    return {"model": model, "distance": distance, "threshold": rec.threshold,
            "same": distance < rec.threshold, "faces": faces}


def format_result(result: dict) -> str:
    """Returns the one-line human summary of a compare result."""
    verdict = "same person" if result["same"] else "different people"
    a, b = (f["file"] for f in result["faces"])
    return (f"{a} vs {b}: {result['model']} distance {result['distance']:.4f} "
            f"(threshold {result['threshold']}) -> {verdict}")
