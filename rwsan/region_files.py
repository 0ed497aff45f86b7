"""Reading an image's region features from a `.npz` file in the original RWSAN release's layout.

Both ends of the data flow read these files: `data_scripts/prepare_vqa.py` packs them into Arrow tables, and the
pipeline answers questions about a file given to it directly. This file is also copied beside saved pipelines (a
relative import of `pipeline_rwsan`), so it imports only the standard library and numpy.
"""

import math
import zipfile
import zlib

import numpy as np

# Everything np.load raises for a corrupt, truncated or foreign file.
NPZ_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile, zlib.error)
# The sizes an image's `.npz` may hold beside its features and boxes.
SIZE_FIELDS = ("num_bbox", "image_w", "image_h")


def read_region_archive(path: str) -> tuple[dict, dict]:
    """
    The arrays RWSAN reads from an image's `.npz` in the original release's layout, those the file holds: `x`, the
    region features (required), `bbox`, and the sizes `num_bbox`, `image_w` and `image_h` (read them with
    `parse_size`).

    Returns:
        `(arrays, unreadable)`: the arrays read, by name, and for each of the optional ones that the file holds but
        that cannot be read (an object array, say, which reading would unpickle), why. The model reads only `x`.

    Raises:
        `ValueError` saying why, for a file that is no readable `.npz` archive or holds no readable `x`.
    """
    arrays, unreadable = {}, {}
    try:
        with open(path, "rb") as handle:
            start = handle.read(6)
        if start.startswith(b"PK"):
            with np.load(path) as archive:
                names = archive.files
                if "x" in names:
                    arrays["x"] = archive["x"]
                for name in ("bbox", *SIZE_FIELDS):
                    if name in names:
                        try:
                            arrays[name] = archive[name]
                        except NPZ_READ_ERRORS as error:
                            unreadable[name] = f"cannot be read: {error!r}"
    except NPZ_READ_ERRORS as error:
        raise ValueError(f"cannot read: {error!r}") from None
    # np.load takes any other file for a pickle, and says so: a photo given by mistake would read as one.
    if not start.startswith(b"PK"):
        raise ValueError(
            "it holds a single array, not an .npz archive"
            if start == b"\x93NUMPY"
            else f"it is no .npz archive (a zip file), but starts with the bytes {start!r}"
        )
    if "x" not in arrays:
        raise ValueError(f"no 'x' (the region features) among its arrays: {', '.join(names) or 'none'}")
    return arrays, unreadable


def parse_size(value) -> int | None:
    """An image size or region count as an `.npz` holds it (an array of one value: some feature extractors store
    sizes as `(1,)` arrays) or a TSV file gives it, as an `int`: None unless a positive whole number below 2**31
    (what the prepared tables store)."""
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind not in "iuf":
        return None
    number = array.item()
    if not (math.isfinite(number) and float(number).is_integer() and 0 < number < 2**31):
        return None
    return int(number)


def shown_size(value) -> str:
    """A size as `parse_size` was given it, for a message."""
    return str(np.asarray(value).tolist())


def image_size_fault(width, height) -> str | None:
    """What is wrong with an `.npz`'s `image_w` and `image_h` (None where absent), or None."""
    if all(size is None or parse_size(size) is not None for size in (width, height)):
        return None
    sizes = " x ".join("none" if size is None else shown_size(size) for size in (width, height))
    return f"image_w x image_h is {sizes}, expected positive whole numbers below 2**31"


def regions_first(features: np.ndarray, feature_size: int) -> np.ndarray:
    """An `.npz`'s `x` as `(num_regions, feature_size)`: the original ships `(feature_size, num_regions)`, others
    the transpose; when both axes equal `feature_size`, the original's layout wins. Raises `ValueError` for
    other shapes."""
    if features.ndim != 2 or feature_size not in features.shape:
        raise ValueError(
            f"x has shape {features.shape}, expected ({feature_size}, num_regions) or (num_regions, {feature_size})"
        )
    return features.T if features.shape[0] == feature_size else features
