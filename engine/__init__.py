"""faceveil's engine: the host face pipeline, the protection methods, the attacks, the CLI.

The curated surface (what a user imports; `tests/engine/test_engine_api.py` pins it):

    from faceveil.engine import cloak_images, cloak_video      # the photo and video cloak
    from faceveil.engine import protect_photos, protect_video  # any method on the pipeline
    from faceveil.engine import make_veil, Veil, veil_images, recover_images   # person veils
    from faceveil.engine import veil_video, recover_video, veil_files, recover_files
    from faceveil.engine import mask_images, restore_mask, MaskConfig     # mask templates
    from faceveil.engine import detect, image_io, video_io, recognise, faces, protection

Folders: `pipeline/` (decode, detect, track, plan chips, batch, paste back, encode; the photo
and video runs and the chain runner), `methods/` (one module per method plus `base`, the
method interface), `attacks/` (the attacker's view), `commands/` (the absl CLI).
"""

from faceveil.engine import keyfile
from faceveil.engine.attacks import protection
from faceveil.engine.methods import base, cloak
from faceveil.engine.methods.base import FaceFrame, FaceOutput, Method
from faceveil.engine.methods.cloak import CloakConfig, CloakMethod
from faceveil.engine.methods.mask import MaskConfig, MaskMethod
from faceveil.engine.methods.veil import VeilConfig, VeilMethod
from faceveil.engine.pipeline import align, detect, faces, image_io, recognise, track, video_io
from faceveil.engine.pipeline.image_io import InputError
from faceveil.engine.pipeline.masks import MaskResult, mask_images
from faceveil.engine.pipeline.masks import restore as restore_mask
from faceveil.engine.pipeline.photos import FaceRecords, PhotoResult, cloak_images, protect_photos
from faceveil.engine.pipeline.photos import summary as photo_summary
from faceveil.engine.pipeline.veil_files import recover_files, veil_files
from faceveil.engine.pipeline.veils import (
    Veil,
    make_veil,
    recover_images,
    recover_video,
    veil_images,
    veil_video,
)
from faceveil.engine.pipeline.video import VideoJob, VideoResult, cloak_video, protect_video
from faceveil.engine.pipeline.video import summary as video_summary

__all__ = [
    "CloakConfig",
    "CloakMethod",
    "FaceFrame",
    "FaceOutput",
    "FaceRecords",
    "InputError",
    "MaskConfig",
    "MaskMethod",
    "MaskResult",
    "Method",
    "PhotoResult",
    "Veil",
    "VeilConfig",
    "VeilMethod",
    "VideoJob",
    "VideoResult",
    "align",
    "base",
    "cloak",
    "cloak_images",
    "cloak_video",
    "detect",
    "faces",
    "image_io",
    "keyfile",
    "make_veil",
    "mask_images",
    "photo_summary",
    "protect_photos",
    "protect_video",
    "protection",
    "recognise",
    "recover_files",
    "recover_images",
    "recover_video",
    "restore_mask",
    "track",
    "veil_files",
    "veil_images",
    "veil_video",
    "video_io",
    "video_summary",
]
