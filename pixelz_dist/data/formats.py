"""What an image file's bytes say about it: whether its pixels are stored losslessly, and if not, in what lossy form.

Decided by content, never by the name: a JPEG saved as ``mask.png`` is still a JPEG. Two callers need it: the pixel
cache stores only lossless images (a JPEG decodes fast and by region), and a ``label`` folder refuses lossy ones
(their values are not the class indices that were drawn).
"""

from __future__ import annotations

import io

from PIL import Image

__all__ = ["is_lossless", "lossy_kind"]

#: TIFF compressions (Pillow's names) whose decode is not the stored data.
_LOSSY_TIFF = frozenset({"jpeg", "tiff_jpeg", "webp", "jpeg2000"})


def is_lossless(data: bytes) -> bool:
    """Whether the file's content (not its name) is a losslessly stored image.

    PNG, BMP, GIF, QOI, PNM and TIFF (unless JPEG/WebP-compressed) and lossless WebP are; JPEG, lossy WebP and
    formats this function does not know are not.
    """
    return lossy_kind(data) is None


def lossy_kind(data: bytes) -> str | None:
    """``None`` for a losslessly stored image, else what it is, for a message: ``"a JPEG"``, ``"a lossy WebP"``..."""
    head = data[:16]
    if head.startswith((b"\x89PNG\r\n\x1a\n", b"BM", b"GIF87a", b"GIF89a", b"qoif")):
        return None
    if len(head) > 2 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return None
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        try:
            with Image.open(io.BytesIO(data)) as img:  # header only: the compression tag
                compression = img.info.get("compression", "raw")
        except Exception:
            return "a TIFF whose header cannot be read"  # the decoder reports it
        return None if compression not in _LOSSY_TIFF else f"a TIFF with lossy {compression} compression"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return None if _webp_lossless(data) else "a lossy WebP"
    return "not a lossless format this library knows (PNG, TIFF, BMP, GIF, QOI, PNM, lossless WebP)"


def _webp_lossless(data: bytes) -> bool:
    # Top-level chunks: "VP8L" alone is lossless; "VP8 " (lossy), "ANMF" (animation frames) are not.
    pos, seen = 12, set()
    while pos + 8 <= len(data) and len(seen) < 16:
        fourcc = data[pos : pos + 4]
        seen.add(fourcc)
        pos += 8 + int.from_bytes(data[pos + 4 : pos + 8], "little")
        pos += pos & 1
        if fourcc in (b"VP8 ", b"VP8L", b"ANMF"):
            break
    return b"VP8L" in seen and b"VP8 " not in seen and b"ANMF" not in seen
