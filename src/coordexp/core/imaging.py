"""Opening images the user brings: one place decides which are refused, and why.

``preprocess`` (COCO images), ``evaluate`` (the evaluated split's images), ``coordexp predict`` (files named on
the command line) and the served MLflow model (request bytes) all open images through here, so they refuse the
same inputs for the same reasons. The reasons that matter most:

* ``image_too_large``: the header claims more pixels than Pillow decodes (``PIL.Image.MAX_IMAGE_PIXELS`` twice
  over, about 179 megapixels by default): a decompression bomb, a few bytes that would take gigabytes to decode.
  Pillow checks the size when it reads the header, so the refusal costs no decoding;
* ``unreadable_image``: not an image Pillow can identify, a corrupt or truncated file, or one that cannot be read;
* ``image_too_small``: fewer than 2x2 pixels, which no coordinate can be placed on.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from coordexp.core.errors import UserError

TOO_LARGE = "image_too_large"
UNREADABLE = "unreadable_image"
TOO_SMALL = "image_too_small"

# Pillow's decoding errors that are not OSErrors (a few plugins raise SyntaxError or ValueError)
_DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError)


class ImageRefused(UserError, ValueError):
    """An image that is not used: ``reason`` is one of the codes above, ``detail`` says what was found."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _refusal(exc: BaseException) -> ImageRefused:
    if isinstance(exc, Image.DecompressionBombError):
        return ImageRefused(TOO_LARGE, f"image too large, refused as a possible decompression bomb ({exc})")
    if isinstance(exc, UnidentifiedImageError):
        return ImageRefused(UNREADABLE, "not an image (Pillow cannot identify its format)")
    return ImageRefused(UNREADABLE, f"unreadable or corrupt image ({type(exc).__name__}: {exc})")


def check_header(source: str | Path | BinaryIO) -> tuple[int, int]:
    """``(width, height)`` from the header alone; an :class:`ImageRefused` for a bomb or a file Pillow cannot
    identify. Cheap (nothing is decoded), so a stage can check every image before it starts its real work."""
    try:
        with Image.open(source) as im:
            return im.size
    except (Image.DecompressionBombError, *_DECODE_ERRORS) as exc:
        raise _refusal(exc) from None


def load(source: str | Path | BinaryIO) -> Image.Image:
    """The fully decoded image, in the file's own mode; an :class:`ImageRefused` saying why it cannot be used."""
    im = None
    try:
        im = Image.open(source)
        im.load()  # Pillow closes a file it opened itself once the image is decoded
        return im
    except (Image.DecompressionBombError, *_DECODE_ERRORS) as exc:
        if im is not None:
            im.close()
        raise _refusal(exc) from None


def load_rgb(source: str | Path | BinaryIO) -> Image.Image:
    """The decoded image in RGB, at least 2x2 pixels; an :class:`ImageRefused` otherwise."""
    with load(source) as im:
        try:
            rgb = im.convert("RGB")
        except _DECODE_ERRORS as exc:
            raise _refusal(exc) from None
    if min(rgb.size) < 2:
        raise ImageRefused(TOO_SMALL, f"image is {rgb.width}x{rgb.height} pixels; at least 2x2 are needed")
    return rgb
