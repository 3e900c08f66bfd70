"""fast_img_loader: Pillow's pixels from every backend, orientation, modes, errors, and backend choice/fallback."""

from __future__ import annotations

import io
import logging
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2.functional import pil_to_tensor

from pixelz_dist.data import images
from pixelz_dist.data.images import fast_img_loader, jpeg_backend, set_jpeg_backend
from pixelz_dist.errors import ConfigError, DataError

# libjpeg-turbo's accurate integer IDCT and its "fancy" upsampling are the defaults of Pillow and of every backend
# here; they gave identical pixels on every image tried (libjpeg-turbo 2.1.5 and 3.x). One grey level is the
# tolerance allowed between builds; a wrong colour conversion or upsampling differs by tens.
TOLERANCE = 1
OPTIONAL = {"turbojpeg": "turbojpeg", "jpeg4py": "jpeg4py"}  # backend -> module, installed through the jpeg extra


@pytest.fixture(autouse=True)
def _restore_backend(monkeypatch):
    monkeypatch.delenv(images.ENV_VAR, raising=False)
    saved = dict(images._active)
    yield
    images._active.update(saved)


def skip_unless_required(reason):
    """Skipped where the optional decoders are missing; failed where CI requires them (PIXELZ_REQUIRE_JPEG_LIBS=1)."""
    if os.environ.get("PIXELZ_REQUIRE_JPEG_LIBS") == "1":
        pytest.fail(f"PIXELZ_REQUIRE_JPEG_LIBS=1 but {reason}")
    pytest.skip(reason)


def use_backend(name):
    if name in OPTIONAL:
        try:
            __import__(OPTIONAL[name])
        except ImportError as exc:
            skip_unless_required(f"optional JPEG backend {name} is not installed ({exc})")
    got = set_jpeg_backend(name)
    if got != name:
        skip_unless_required(f"optional JPEG backend {name} is installed but unusable here (system libturbojpeg "
                             "missing?)")
    return name


@pytest.fixture(params=["simplejpeg", "turbojpeg", "jpeg4py", "pil"])
def backend(request):
    return use_backend(request.param)


@pytest.fixture(params=["simplejpeg", "turbojpeg", "jpeg4py"])
def fast_backend(request):
    return use_backend(request.param)


def photo(h=96, w=128, seed=0):
    """Smooth shading plus blocky and fine texture: compresses and decodes like a photograph, unlike noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [128 + 90 * np.sin(xx / 9 + yy / 23), 128 + 80 * np.cos(yy / 7 - xx / 31), 128 + 60 * np.sin((xx + yy) / 13)],
        axis=-1,
    )
    blocks = rng.normal(0, 18, (h // 4 + 1, w // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)[:h, :w]
    return np.clip(base + blocks + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)


def save_jpeg(path, arr, **kwargs):
    Image.fromarray(arr).save(path, "JPEG", quality=kwargs.pop("quality", 90), **kwargs)
    return str(path)


def pillow_rgb(path):
    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"), dtype=np.int16)


def independent_rgb(path):
    """torchvision.io's decode (its own libjpeg build): the reference for the ``pil`` backend, which is Pillow itself,
    so that no backend is compared with itself."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    return decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB).permute(1, 2, 0).numpy().astype(np.int16)


def assert_close(got, expected):
    got = np.asarray(got, dtype=np.int16)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOLERANCE


@pytest.mark.parametrize("subsampling", ["4:2:0", "4:4:4", "4:2:2"])
@pytest.mark.parametrize("progressive", [False, True])
def test_same_pixels_as_pillow(tmp_path, backend, subsampling, progressive):
    path = save_jpeg(tmp_path / "p.jpg", photo(), subsampling=subsampling, progressive=progressive)
    expected = independent_rgb(path) if backend == "pil" else pillow_rgb(path)
    img = fast_img_loader(path)
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (128, 96)
    assert_close(img, expected)
    t = fast_img_loader(path, as_tensor=True)
    assert t.dtype == torch.uint8 and t.shape == (3, 96, 128)
    assert_close(t.permute(1, 2, 0).numpy(), expected)
    # "L" is Pillow's convert("L") of the colour decode, exactly: the fast luma path is opt-in only
    with Image.open(path) as ref:
        grey = np.asarray(ref.convert("L"), dtype=np.int16)
    if backend == "pil":  # Pillow's conversion of the independent decode
        grey = np.asarray(Image.fromarray(expected.astype(np.uint8)).convert("L"), dtype=np.int16)
    assert_close(fast_img_loader(path, "L"), grey)
    assert_close(fast_img_loader(path, "L", as_tensor=True)[0].numpy(), grey)


def test_fast_grey_is_the_luma_plane_and_opt_in(tmp_path, backend):
    path = save_jpeg(tmp_path / "p.jpg", photo(seed=3))
    with Image.open(path) as ref:
        exact = np.asarray(ref.convert("L"), dtype=np.int16)
    with Image.open(path) as ref:
        ref.draft("L", ref.size)
        luma = np.asarray(ref.convert("L"), dtype=np.int16)
    fast = fast_img_loader(path, "L", fast_grey=True)
    assert fast.mode == "L"
    assert_close(fast, luma)
    diff = np.abs(np.asarray(fast, dtype=np.int16) - exact)
    assert 0 < diff.max() <= 4  # a few grey levels: why it is never the default
    t = fast_img_loader(path, "L", as_tensor=True, fast_grey=True)
    assert t.shape == (1, 96, 128)
    assert_close(t[0].numpy(), luma)


def test_grey_jpeg(tmp_path, backend):
    arr = photo()[:, :, 1]
    path = str(tmp_path / "g.jpg")
    Image.fromarray(arr, "L").save(path, quality=90)
    with Image.open(path) as ref:
        grey = np.asarray(ref, dtype=np.int16)
    for mode in ("L", "auto", "unchanged"):
        img = fast_img_loader(path, mode)
        assert img.mode == "L"
        assert_close(img, grey)
        assert fast_img_loader(path, mode, as_tensor=True).shape == (1, 96, 128)
    rgb = fast_img_loader(path)  # replicated, like Pillow's convert("RGB")
    assert rgb.mode == "RGB"
    assert_close(rgb, np.repeat(grey[:, :, None], 3, axis=2))


def test_cmyk_jpeg_goes_through_pillow(tmp_path, backend):
    path = str(tmp_path / "c.jpg")
    Image.fromarray(photo()).convert("CMYK").save(path, quality=90)
    assert_close(fast_img_loader(path), pillow_rgb(path))
    assert_close(fast_img_loader(path, as_tensor=True).permute(1, 2, 0).numpy(), pillow_rgb(path))
    assert fast_img_loader(path, "unchanged").mode == "CMYK"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_like_exif_transpose(tmp_path, backend, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save_jpeg(tmp_path / "o.jpg", photo(h=40, w=56), exif=exif.tobytes())
    expected = pillow_rgb(path)  # ImageOps.exif_transpose applied
    assert expected.shape[:2] == ((56, 40) if orientation >= 5 else (40, 56))
    assert_close(fast_img_loader(path), expected)
    assert_close(fast_img_loader(path, as_tensor=True).permute(1, 2, 0).numpy(), expected)
    with Image.open(path) as ref:
        grey = np.asarray(ImageOps.exif_transpose(ref).convert("L"), dtype=np.int16)
    assert_close(fast_img_loader(path, "L"), grey)
    assert_close(fast_img_loader(path, "L", as_tensor=True)[0].numpy(), grey)
    with Image.open(path) as ref:
        stored = np.asarray(ref.convert("RGB"), dtype=np.int16)
    assert_close(fast_img_loader(path, exif=False), stored)


def test_exif_orientation_in_big_endian_tiff_and_png(tmp_path, backend):
    # A big-endian Exif block written by hand, as cameras do; and a PNG, which only Pillow decodes.
    entry = (0x0112).to_bytes(2, "big") + (3).to_bytes(2, "big") + (1).to_bytes(4, "big") + (6).to_bytes(2, "big")
    tiff = b"MM\x00*" + (8).to_bytes(4, "big") + (1).to_bytes(2, "big") + entry + b"\x00\x00" + b"\x00" * 4
    path = save_jpeg(tmp_path / "be.jpg", photo(h=40, w=56), exif=b"Exif\x00\x00" + tiff)
    assert fast_img_loader(path).size == (40, 56)
    assert_close(fast_img_loader(path), pillow_rgb(path))
    exif = Image.Exif()
    exif[0x0112] = 8
    png = str(tmp_path / "o.png")
    Image.fromarray(photo(h=40, w=56)).save(png, exif=exif.tobytes())
    assert_close(fast_img_loader(png), pillow_rgb(png))
    assert fast_img_loader(png).size == (40, 56)


def test_other_formats_and_modes_match_pillow(tmp_path, backend):
    cases = {
        "rgba.png": Image.fromarray(np.dstack([photo(), np.full((96, 128), 200, np.uint8)])),
        "palette.png": Image.fromarray(photo()).convert("P"),
        "deep.png": Image.new("I;16", (5, 4), 4000),
        "grey.bmp": Image.fromarray(photo()[:, :, 0]),
        "photo.webp": Image.fromarray(photo()),
    }
    for name, img in cases.items():
        path = str(tmp_path / name)
        img.save(path)
        with Image.open(path) as ref:
            ref.load()
            for mode in ("RGB", "L", "unchanged"):
                want = ref if mode == "unchanged" else ref.convert(mode)
                got = fast_img_loader(path, mode)
                assert got.mode == want.mode and np.array_equal(np.asarray(got), np.asarray(want)), (name, mode)
                assert torch.equal(fast_img_loader(path, mode, as_tensor=True), pil_to_tensor(want)), (name, mode)
    assert fast_img_loader(str(tmp_path / "palette.png"), "unchanged").mode == "P"  # class indices kept
    assert fast_img_loader(str(tmp_path / "palette.png"), "auto").mode == "RGB"
    assert fast_img_loader(str(tmp_path / "deep.png"), "auto").getpixel((0, 0)) == 4000


def test_decoding_errors_name_the_file(tmp_path, backend):
    good = save_jpeg(tmp_path / "good.jpg", photo())
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])  # Pillow refuses it too: no silently grey half image
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0" + b"\x13" * 300)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path in (truncated, garbage, empty, tmp_path / "missing.jpg"):
        with pytest.raises(DataError, match=repr(str(path)).replace("\\", "\\\\")) as info:
            fast_img_loader(str(path))
        if path == empty:  # nothing below it to chain: the message says it (Pillow's was "cannot identify image file")
            assert "the file is empty (0 bytes)" in str(info.value)
        else:
            assert info.value.__cause__ is not None
    with pytest.raises(ConfigError, match="unknown image mode"):
        fast_img_loader(good, "rgb")


def test_header_parser_never_crashes_on_damaged_files(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(photo(h=16, w=16)).save(buf, "JPEG", exif=exif.tobytes())
    data = buf.getvalue()
    assert images._jpeg_header(data) == (16, 16, 3, 6)
    rng = np.random.default_rng(0)
    for cut in range(0, 400, 3):
        header = images._jpeg_header(data[:cut])
        assert header is None or header == (16, 16, 3, 6)
    for _ in range(300):  # flipped bytes in the header area
        damaged = bytearray(data)
        damaged[int(rng.integers(2, 300))] = int(rng.integers(0, 256))
        header = images._jpeg_header(bytes(damaged))
        assert header is None or (len(header) == 4 and 1 <= header[3] <= 8)


def test_env_var_forces_the_backend(monkeypatch):
    monkeypatch.setenv(images.ENV_VAR, "pil")
    assert set_jpeg_backend() == "pil" and jpeg_backend() == "pil"
    monkeypatch.setenv(images.ENV_VAR, "no-such-decoder")
    with pytest.raises(ConfigError, match="no-such-decoder.*PIXELZ_JPEG_BACKEND"):
        set_jpeg_backend()
    with pytest.raises(ConfigError, match="HINT"):
        set_jpeg_backend("libjpeg")
    monkeypatch.delenv(images.ENV_VAR)
    assert set_jpeg_backend("auto") == set_jpeg_backend() == "simplejpeg"  # the measured fastest, a dependency


def test_missing_backends_fall_back_cleanly(tmp_path, monkeypatch, caplog):
    path = save_jpeg(tmp_path / "p.jpg", photo())
    expected = pillow_rgb(path)
    for module in ("turbojpeg", "jpeg4py"):
        monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    with caplog.at_level(logging.WARNING, logger="pixelz_dist"):
        assert set_jpeg_backend("jpeg4py") == "simplejpeg"
    assert "jpeg4py unavailable" in caplog.text
    monkeypatch.setitem(sys.modules, "simplejpeg", None)
    assert set_jpeg_backend("auto") == "pil"
    assert_close(fast_img_loader(path), expected)
    assert_close(fast_img_loader(path, as_tensor=True).permute(1, 2, 0).numpy(), expected)


def test_a_backend_with_wrong_pixels_is_refused(monkeypatch, caplog):
    def broken():
        return (lambda data, fmt: np.zeros((16, 24, 3), np.uint8)), "broken"

    monkeypatch.setitem(images._LOADERS, "simplejpeg", broken)
    with caplog.at_level(logging.INFO, logger="pixelz_dist"):
        assert set_jpeg_backend("simplejpeg") != "simplejpeg"
    assert "differ from Pillow" in caplog.text
    assert "JPEG decoding with broken" not in caplog.text


def test_backend_chosen_and_logged_once(tmp_path, caplog):
    path = save_jpeg(tmp_path / "p.jpg", photo())
    images._active.update(name=None, decode=None)
    with caplog.at_level(logging.INFO, logger="pixelz_dist"):
        for _ in range(3):
            fast_img_loader(path)
    assert caplog.text.count("JPEG decoding with") == 1


def test_jpeg_fast_path_does_not_touch_pillow_decoding(tmp_path, fast_backend, monkeypatch):
    exif = Image.Exif()
    exif[0x0112] = 6
    colour = save_jpeg(tmp_path / "c.jpg", photo(), exif=exif.tobytes(), progressive=True)
    grey = str(tmp_path / "g.jpg")
    Image.fromarray(photo()[:, :, 0], "L").save(grey)

    def no_pillow(*args, **kwargs):
        raise AssertionError("an 8-bit grey or colour JPEG went through Pillow")

    monkeypatch.setattr(images, "_decode_pil", no_pillow)
    for path in (colour, grey):
        for mode in ("RGB", "L", "auto", "unchanged"):
            for as_tensor in (False, True):
                fast_img_loader(path, mode, as_tensor=as_tensor)
                fast_img_loader(path, mode, as_tensor=as_tensor, fast_grey=True)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's own notice, expected here
def test_unreadable_exif_keeps_the_stored_orientation(tmp_path, backend):
    stored = photo(h=40, w=56)
    for i, junk in enumerate([b"Exif\x00\x00MM\x00*\xff\xff\xff\xf0", b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff"]):
        path = save_jpeg(tmp_path / f"junk{i}.jpg", stored, exif=junk)
        with Image.open(path) as ref:
            expected = np.asarray(ref.convert("RGB"), dtype=np.int16)
        got = fast_img_loader(path)
        assert got.size == (56, 40)
        assert_close(got, expected)
