"""Why an image cannot be read, for a call that reports each bad image and goes on with the others (``predict``).
The messages are :func:`taskres.data.images.read_image`'s, less the advice to skip such images, which such a call
already does."""

from __future__ import annotations

import os
from collections.abc import Iterable

from taskres.data.images import read_image
from taskres.errors import TaskResError

SKIP_ADVICE = ", or pass --skip-bad-images to leave such images out"


def unreadable_files(paths: Iterable[str]) -> dict[str, str]:
    """path -> why, for the paths that cannot be opened as a file (missing, a folder, no permission); checked
    before any encoding."""
    errors = {}
    for path in paths:
        if not os.path.exists(path):
            errors[path] = f"image {path!r} does not exist"
        elif os.path.isdir(path):
            errors[path] = f"image {path!r} is a folder, not an image file"
        elif not os.access(path, os.R_OK):
            errors[path] = f"image {path!r} cannot be read (permission denied); fix its permissions"
    return errors


def decode_errors(paths: Iterable[str], max_pixels: int | None) -> dict[str, str]:
    """path -> why, for images the encoder skipped: each is opened again (they fail fast) for the reason."""
    errors = {}
    for path in paths:
        try:
            read_image(path, max_pixels)
            errors[path] = f"image {path!r} cannot be decoded"  # it failed in the encoder's worker only
        except TaskResError as err:
            errors[path] = str(err).replace(SKIP_ADVICE, "")
    return errors
