"""decode_jpeg_region: a box bit for bit the whole decode's, the scaled window, errors that never crash, no extension.

The whole decodes compared against are simplejpeg's (libjpeg-turbo 3.x, through fast_img_loader) and Pillow's; the
region decoder links the system libjpeg-turbo (2.1.5 on Debian 12).
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from pixelz_dist.data import images
from pixelz_dist.data.images import fast_img_loader, set_jpeg_backend
from pixelz_dist.data.jpeg_region import decode_jpeg_region, region_decoder_available

REQUIRE_VAR = "PIXELZ_REQUIRE_JPEG_REGION"  # set by .ci/run where libjpeg's headers are installed

# (height, width): odd sizes, sizes that are not multiples of 8 or 16, one pixel, a thin strip
SIZES = [(97, 130), (61, 83), (17, 9), (1, 1), (5, 203)]
VARIANTS = {
    "420-q75": dict(quality=75, subsampling=2),
    "420-q95": dict(quality=95, subsampling=2),
    "422-q75": dict(quality=75, subsampling=1),
    "444-q95": dict(quality=95, subsampling=0),
    "420-progressive": dict(quality=75, subsampling=2, progressive=True),
    "422-progressive-q95": dict(quality=95, subsampling=1, progressive=True),
    "420-restart-rows": dict(quality=90, subsampling=2, restart_marker_rows=1),
    "444-restart-blocks": dict(quality=90, subsampling=0, restart_marker_blocks=3),
}


@pytest.fixture
def runs_without_extension():
    """Requested by a test that does not need the extension."""


@pytest.fixture(autouse=True)
def _extension_built(request):
    if "runs_without_extension" in request.fixturenames or region_decoder_available():
        return
    reason = "pixelz_dist.data._jpeg_region is not built (no C compiler or libjpeg headers at install time)"
    if os.environ.get(REQUIRE_VAR) == "1":
        pytest.fail(f"{REQUIRE_VAR}=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _simplejpeg_backend(monkeypatch):
    monkeypatch.delenv(images.ENV_VAR, raising=False)
    saved = dict(images._active)
    assert set_jpeg_backend("simplejpeg") == "simplejpeg"
    yield
    images._active.update(saved)


def photo(h: int, w: int, seed: int = 0, grey: bool = False) -> np.ndarray:
    """Gradients, texture and noise: they show chroma-upsampling errors at a box's edges, unlike flat colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx * 255 / w, yy * 255 / h, (np.sin(xx / 5) + np.cos(yy / 7)) * 60 + 128], axis=-1)
    arr = np.clip(base + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)
    return arr.mean(axis=2).astype(np.uint8) if grey else arr


def write_jpeg(path, arr: np.ndarray, **options) -> bytes:
    Image.fromarray(arr).save(path, "JPEG", **options)
    with open(path, "rb") as f:
        return f.read()


def boxes(h: int, w: int, seed: int, count: int = 40):
    """Random boxes, plus the whole image, single pixels in every corner, boxes touching each edge and boxes whose
    edges sit on iMCU boundaries (where cropping and skipping restart the upsampling)."""
    yield 0, 0, h, w
    for top, left in [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 2)]:
        yield top, left, 1, 1
    yield 0, w // 3, h, max(1, w // 3)  # top and bottom edges
    yield h // 3, 0, max(1, h // 3), w  # left and right edges
    for a in (8, 16, 32):
        if a < h and a < w:
            yield a, a, h - a, w - a  # to the bottom-right corner
            yield a, a, min(a, h - a), min(a, w - a)
            yield 0, 0, a, a
    rng = np.random.default_rng(seed)
    for _ in range(count):
        top, left = int(rng.integers(0, h)), int(rng.integers(0, w))
        yield top, left, int(rng.integers(1, h - top + 1)), int(rng.integers(1, w - left + 1))


def crop(full: np.ndarray, box) -> np.ndarray:
    top, left, h, w = box
    return full[top : top + h, left : left + w]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rgb_box_equals_whole_decode_cropped(tmp_path, variant):
    for i, (h, w) in enumerate(SIZES):
        path = tmp_path / f"{i}.jpg"
        data = write_jpeg(path, photo(h, w, seed=i), **VARIANTS[variant])
        whole = fast_img_loader(path, "RGB", as_tensor=True).permute(1, 2, 0).numpy()
        with Image.open(path) as img:
            pillow = np.asarray(img.convert("RGB"))
        assert np.array_equal(whole, pillow)  # the reference itself: libjpeg-turbo 3.x and Pillow agree
        for box in boxes(h, w, seed=i):
            got = decode_jpeg_region(data, "RGB", box)
            assert got.dtype == np.uint8 and got.shape == (box[2], box[3], 3), box
            assert np.array_equal(got, crop(whole, box)), f"{variant} {h}x{w} box {box}"


@pytest.mark.parametrize("sampling", ["TJSAMP_440", "TJSAMP_411"])
def test_samplings_pillow_cannot_write(sampling):
    """4:4:0 (vertical chroma upsampling only) and 4:1:1 (four columns per chroma sample), written by TurboJPEG."""
    try:  # PyTurboJPEG (the test extra) writes 4:4:0 and 4:1:1 files
        import turbojpeg

        tj = turbojpeg.TurboJPEG()
    except Exception as exc:  # not installed, or the package without the system libturbojpeg
        if os.environ.get("PIXELZ_REQUIRE_JPEG_LIBS") == "1":  # set by .ci/run in CI, which installs them
            pytest.fail(f"PIXELZ_REQUIRE_JPEG_LIBS=1 but PyTurboJPEG cannot be used: {exc}")
        pytest.skip(f"PyTurboJPEG cannot be used: {exc}")
    for i, (h, w) in enumerate(SIZES[:3]):
        data = tj.encode(photo(h, w, seed=i), quality=85, pixel_format=turbojpeg.TJPF_RGB,
                         jpeg_subsample=getattr(turbojpeg, sampling))
        whole = simplejpeg.decode_jpeg(data, colorspace="RGB")
        with Image.open(io.BytesIO(data)) as img:
            assert np.array_equal(whole, np.asarray(img.convert("RGB")))
        for box in boxes(h, w, seed=i):
            assert np.array_equal(decode_jpeg_region(data, "RGB", box), crop(whole, box)), f"{sampling} box {box}"


@pytest.mark.parametrize("variant", ["420-q75", "444-q95", "420-progressive"])
def test_gray_and_rgbx_boxes_equal_whole_decode_cropped(tmp_path, variant):
    h, w = 97, 130
    colour = write_jpeg(tmp_path / "c.jpg", photo(h, w, seed=3), **VARIANTS[variant])
    grey_path = tmp_path / "g.jpg"
    options = {k: v for k, v in VARIANTS[variant].items() if k != "subsampling"}
    grey = write_jpeg(grey_path, photo(h, w, seed=4, grey=True), **options)
    whole_luma = simplejpeg.decode_jpeg(colour, colorspace="GRAY")
    whole_rgbx = simplejpeg.decode_jpeg(colour, colorspace="RGBX")
    whole_grey = fast_img_loader(grey_path, "L", as_tensor=True).permute(1, 2, 0).numpy()
    whole_grey_rgb = fast_img_loader(grey_path, "RGB", as_tensor=True).permute(1, 2, 0).numpy()
    with Image.open(grey_path) as img:
        assert np.array_equal(whole_grey[:, :, 0], np.asarray(img.convert("L")))
    for box in boxes(h, w, seed=5, count=25):
        assert np.array_equal(decode_jpeg_region(colour, "GRAY", box), crop(whole_luma, box)), box
        assert np.array_equal(decode_jpeg_region(colour, "RGBX", box), crop(whole_rgbx, box)), box
        assert np.array_equal(decode_jpeg_region(grey, "GRAY", box), crop(whole_grey, box)), box
        assert np.array_equal(decode_jpeg_region(grey, "RGB", box), crop(whole_grey_rgb, box)), box


def scaled_window(box, k: int, h: int, w: int) -> tuple[slice, slice]:
    top, left, bh, bw = box
    rows = slice(top // k, min(-(-(top + bh) // k), -(-h // k)))
    cols = slice(left // k, min(-(-(left + bw) // k), -(-w // k)))
    return rows, cols


@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("variant", ["420-q75", "422-q75", "444-q95", "420-progressive"])
def test_scaled_box_is_the_window_of_the_scaled_decode(tmp_path, k, variant):
    h, w = 97, 130
    data = write_jpeg(tmp_path / "p.jpg", photo(h, w, seed=6), **VARIANTS[variant])
    # simplejpeg picks the smallest libjpeg scale that keeps at least min_height x min_width: exactly 1/k here.
    scaled = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-h // k), min_width=-(-w // k))
    assert scaled.shape[:2] == (-(-h // k), -(-w // k))
    for box in boxes(h, w, seed=k, count=25):
        rows, cols = scaled_window(box, k, h, w)
        got = decode_jpeg_region(data, "RGB", box, scale_denom=k)
        assert got.shape == (rows.stop - rows.start, cols.stop - cols.start, 3), box
        assert np.array_equal(got, scaled[rows, cols]), f"1/{k} box {box}"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255**2 / mse)


@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("variant", ["444-q95", "420-q75"])
def test_scaled_box_is_close_to_a_downscaled_crop(tmp_path, k, variant):
    """DCT-domain scaling is no v2 resize, but close: PSNR > 30 dB against an antialiased bilinear downscale of the
    whole decode's crop. Measured here (libjpeg-turbo 2.1.5), 444-q95 / 420-q75: 45.9 / 47.0 dB at 1/2, 48.3 / 47.2 at
    1/4, 45.1 / 44.1 at 1/8; on the noisier photo() (noise 18, q90, 4:2:0) 32.7, 38.4 and 37.0 dB."""
    h, w = 192, 256
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    smooth = np.stack([128 + 90 * np.sin(xx / 17 + yy / 29), 128 + 80 * np.cos(yy / 13 - xx / 31),
                       128 + 60 * np.sin((xx + yy) / 23)], axis=-1)
    noisy = smooth + np.random.default_rng(7).normal(0, 4, (h, w, 3))
    path = tmp_path / "p.jpg"
    data = write_jpeg(path, np.clip(noisy, 0, 255).astype(np.uint8), **VARIANTS[variant])
    whole = fast_img_loader(path, "RGB", as_tensor=True)
    box = (40, 24, 128, 200)  # a multiple of k at every edge: the window is the box itself
    got = decode_jpeg_region(data, "RGB", box, scale_denom=k)
    top, left, bh, bw = box
    assert got.shape == (bh // k, bw // k, 3)
    box_pixels = whole[None, :, top : top + bh, left : left + bw].float()
    ref = torch.nn.functional.interpolate(box_pixels, size=(bh // k, bw // k), mode="bilinear", antialias=True)[0]
    ref = ref.round().clamp(0, 255).permute(1, 2, 0).numpy()
    assert psnr(got, ref) > 30


def test_rows_below_the_box_are_never_decoded(tmp_path):
    """A baseline file cut halfway through its scan: a box above the cut decodes, a whole decode (or a box below the
    cut) fails with libjpeg's message."""
    h, w = 256, 64
    data = write_jpeg(tmp_path / "p.jpg", photo(h, w, seed=8), quality=90, subsampling=2)
    cut = data[: len(data) // 2]
    full = simplejpeg.decode_jpeg(data, colorspace="RGB")
    assert np.array_equal(decode_jpeg_region(cut, "RGB", (10, 5, 40, 50)), full[10:50, 5:55])
    with pytest.raises(ValueError, match="Premature end"):
        decode_jpeg_region(cut, "RGB", (200, 5, 40, 50))
    with pytest.raises(ValueError, match="Premature end"):
        decode_jpeg_region(cut, "RGB", (0, 0, h, w))


def test_bad_data_and_bad_arguments_raise_value_error(tmp_path):
    data = write_jpeg(tmp_path / "p.jpg", photo(61, 83), quality=90)
    corrupt = bytearray(data)
    scan = data.rindex(b"\xff\xda")  # start of scan: stray restart markers in the entropy-coded data (a warning)
    corrupt[scan + 40 : scan + 200] = b"\xff\xd5" * 80
    cases = [
        (b"", "libjpeg could not decode the data: Empty input file"),
        (b"not a jpeg at all", "Not a JPEG file"),
        (data[:20], "Premature end of JPEG file"),
        (bytes(corrupt), "Corrupt JPEG data"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            decode_jpeg_region(bad, "RGB", (0, 0, 61, 83))
    for box in [(0, 0, 62, 83), (0, 80, 1, 4), (61, 0, 1, 1)]:
        with pytest.raises(ValueError, match=r"does not lie inside the 61 x 83 \(height x width\) image"):
            decode_jpeg_region(data, "RGB", box)
    for box in [(-1, 0, 1, 1), (0, 0, 0, 5), (0, 0, 5, 0)]:
        with pytest.raises(ValueError, match="must have top, left >= 0 and height, width >= 1"):
            decode_jpeg_region(data, "RGB", box)
    with pytest.raises(ValueError, match="fmt must be one of"):
        decode_jpeg_region(data, "BGR", (0, 0, 1, 1))
    with pytest.raises(ValueError, match="scale_denom must be one of"):
        decode_jpeg_region(data, "RGB", (0, 0, 1, 1), scale_denom=3)


_FUZZ = """
import sys
import numpy as np
from pixelz_dist.data.jpeg_region import decode_jpeg_region
data = open(sys.argv[1], "rb").read()
rng = np.random.default_rng(0)
failed = decoded = 0
for i in range(400):
    bad = bytearray(data)
    if i % 4 == 0:
        bad = bad[: int(rng.integers(2, len(bad)))]
    for pos in rng.integers(2, len(bad), int(rng.integers(1, 8))):
        bad[pos] = int(rng.integers(0, 256))
    box = (int(rng.integers(0, 40)), int(rng.integers(0, 60)), 20, 20)
    try:
        decode_jpeg_region(bytes(bad), ("RGB", "GRAY", "RGBX")[i % 3], box, (1, 2, 4, 8)[i % 4])
        decoded += 1
    except ValueError:
        failed += 1
print(failed, decoded)
"""


def test_damaged_files_raise_and_never_crash(tmp_path):
    """Random byte changes and cuts, in a process of its own (a crash would end it): ValueError or pixels, nothing
    printed by libjpeg."""
    path = tmp_path / "p.jpg"
    write_jpeg(path, photo(61, 83), quality=90, progressive=False)
    proc = subprocess.run([sys.executable, "-c", _FUZZ, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    failed, decoded = map(int, proc.stdout.split())
    assert failed > 100 and failed + decoded == 400


def test_any_bytes_like_input_and_threads(tmp_path):
    data = write_jpeg(tmp_path / "p.jpg", photo(97, 130, seed=9), quality=85)
    full = simplejpeg.decode_jpeg(data, colorspace="RGB")
    box = (7, 11, 50, 60)
    for source in (bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        assert np.array_equal(decode_jpeg_region(source, "RGB", box), crop(full, box))
    out = decode_jpeg_region(data, "RGB", box)
    assert out.flags.writeable and torch.from_numpy(out).shape == (50, 60, 3)
    all_boxes = list(boxes(97, 130, seed=10, count=60))
    results: dict[int, list[bool]] = {}

    def work(n: int) -> None:
        results[n] = [np.array_equal(decode_jpeg_region(data, "RGB", b), crop(full, b)) for b in all_boxes]

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(all(r) for r in results.values()) and len(results) == 4


def test_without_the_extension_nothing_is_decoded_and_one_debug_line_says_why(runs_without_extension):
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.DEBUG, format='%(name)s %(levelname)s %(message)s')\n"
        "sys.modules['pixelz_dist.data._jpeg_region'] = None  # what an install without a compiler leaves\n"
        "from pixelz_dist.data import jpeg_region\n"
        "import importlib; importlib.import_module('pixelz_dist.data.jpeg_region')\n"
        "print(jpeg_region.region_decoder_available())\n"
        "try:\n"
        "    jpeg_region.decode_jpeg_region(b'', 'RGB', (0, 0, 1, 1))\n"
        "except RuntimeError as exc:\n"
        "    print('RuntimeError', exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "False"
    assert "is not built" in proc.stdout and "libjpeg62-turbo-dev" in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if "JPEG region decoding unavailable" in ln]
    assert len(lines) == 1 and lines[0].startswith("pixelz_dist.data.jpeg_region DEBUG"), proc.stderr
