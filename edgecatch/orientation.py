"""EXIF orientation and boxes: from the stored pixels to the upright image, and back.

Pre-labels are kept in one convention up to delivery: boxes in the image's *stored* pixels, with
the image's size as stored; delivery orients them with the image (`edgecatch.delivery.prepare`).
A reader that gets boxes in the upright image (a model that applied the orientation when it
decoded) turns them back with `stored_box` first: for a flip, a 180° turn or a square image the two
sizes are equal, and the size alone cannot tell which pixels a box is in.
"""

from __future__ import annotations

__all__ = ["ROTATED", "orient_box", "stored_box"]

Box = tuple[float, float, float, float]

ROTATED = frozenset((5, 6, 7, 8))  # orientations whose upright image swaps width and height
_INVERSE = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


def orient_box(box: Box, orientation: int, width: int, height: int) -> Box:
    """Map a box in stored pixels (width x height) through an EXIF orientation's transpose."""
    x1, y1, x2, y2 = box
    w, h = width, height
    if orientation == 2:    # mirror horizontal
        return (w - x2, y1, w - x1, y2)
    if orientation == 3:    # rotate 180
        return (w - x2, h - y2, w - x1, h - y1)
    if orientation == 4:    # mirror vertical
        return (x1, h - y2, x2, h - y1)
    if orientation == 5:    # transpose (x <-> y)
        return (y1, x1, y2, x2)
    if orientation == 6:    # rotate 90 clockwise to display: new x = h - y, new y = x
        return (h - y2, x1, h - y1, x2)
    if orientation == 7:    # transverse
        return (h - y2, w - x2, h - y1, w - x1)
    if orientation == 8:    # rotate 90 counter-clockwise to display: new x = y, new y = w - x
        return (y1, w - x2, y2, w - x1)
    return box


def stored_box(box: Box, orientation: int, upright_width: int, upright_height: int) -> Box:
    """A box in the upright image's pixels (upright_width x upright_height) in the stored pixels:
    `orient_box` undone."""
    return orient_box(box, _INVERSE.get(orientation, 1), upright_width, upright_height)
