"""Data sets: manifest or prefix -> items (:mod:`.manifest`), image and mask decoding and the model's
view of an image (:mod:`.decode`, :mod:`.geometry`), batches (:mod:`.batches`) and getting them onto
the model's device (:mod:`.device`)."""
from .batches import iter_batches
from .decode import MaskSpec, Sample, StaticMask, decode_image, decode_mask, load_sample, model_view
from .geometry import InputSpec
from .manifest import MANIFEST_FORMATS, DataError, Item, load_items

__all__ = ["DataError", "InputSpec", "Item", "MANIFEST_FORMATS", "MaskSpec", "Sample", "StaticMask", "decode_image",
           "decode_mask", "iter_batches", "load_items", "load_sample", "model_view"]
