import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from moonbase.config import VisionConfig, md2
from moonbase.errors import ImageError
from moonbase.image import load_image, normalize, overlap_crops, select_tiling, tiling_for
from moonbase.model.vision import pool_grid, reconstruct

# (H, W) -> tiling, from the spec's table (moondream2-spec.md section 3)
TILING_TABLE = [
    ((378, 378), (1, 1)),
    ((390, 390), (3, 3)),
    ((500, 500), (3, 3)),
    ((767, 773), (3, 3)),
    ((966, 822), (4, 3)),
    ((480, 640), (2, 4)),
    ((600, 800), (2, 4)),
    ((720, 1280), (2, 4)),
    ((1080, 1920), (2, 4)),
    ((3000, 4000), (2, 4)),
    ((768, 1024), (3, 4)),
    ((1024, 1024), (3, 3)),
    ((2048, 2048), (3, 3)),
    ((200, 3000), (1, 1)),
    ((4000, 400), (9, 1)),
]


@pytest.mark.parametrize("hw, tiling", TILING_TABLE)
def test_tiling_table_from_spec(hw, tiling):
    cfg = md2().vision
    assert tiling_for(*hw, cfg) == tiling
    th, tw = tiling
    # canvas and stitched grid columns of the same table
    assert (th * cfg.window_px + 2 * cfg.margin_px, tw * cfg.window_px + 2 * cfg.margin_px)[0] == th * 266 + 112


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8000), st.integers(1, 8000), st.integers(1, 16))
def test_tiling_respects_max_crops_except_for_extreme_aspect_ratios(h, w, max_crops):
    th, tw = select_tiling(h, w, 266, max_crops)
    assert th >= 1 and tw >= 1
    # The reference clamps a zero tile count to 1 only after scaling, so strips more than max_crops times
    # longer than wide can exceed the budget (reproduced for parity, documented in select_tiling).
    if max(h, w) <= max_crops * min(h, w):
        assert th * tw <= max_crops


def test_crops_shapes_and_layout():
    cfg = md2().vision
    img = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    crops = overlap_crops(img, cfg)
    assert crops.tiling == (2, 4)
    assert crops.pixels.shape == (9, 378, 378, 3) and crops.pixels.dtype == np.uint8
    x = normalize(crops.pixels)
    assert x.shape == (9, 3, 378, 378) and x.dtype == torch.float32
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert torch.equal(normalize(np.full((1, 2, 2, 3), 255, np.uint8)), torch.ones(1, 3, 2, 2))


@pytest.mark.parametrize("tiling", [(1, 1), (2, 4), (3, 3), (9, 1)])
def test_reconstruct_and_pool_shapes(tiling):
    g, m, c = 27, 4, 5
    th, tw = tiling
    tiles = torch.randn(th * tw, g, g, c)
    grid = reconstruct(tiles, tiling, m)
    assert grid.shape == (19 * th + 8, 19 * tw + 8, c)
    # each tile's interior lands at its stride offset; border margins come from border tiles
    assert torch.equal(grid[: g - m, : g - m], tiles[0, : g - m, : g - m])
    last = tiles[-1]
    assert torch.equal(grid[-(g - m) :, -(g - m) :], last[m:, m:])
    assert pool_grid(grid, g).shape == (g * g, c)


def test_pool_matches_adaptive_average_semantics():
    grid = torch.arange(65 * 65, dtype=torch.float32).reshape(65, 65, 1)
    pooled = pool_grid(grid, 27).reshape(27, 27)
    # window i spans floor(i*65/27) .. ceil((i+1)*65/27)
    assert torch.isclose(pooled[1, 2], grid[2:5, 4:8].mean())


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_decodes_common_formats_to_rgb(fmt):
    im = Image.new("RGB", (40, 30), (200, 10, 10))
    arr = load_image(_encode(im, fmt))
    assert arr.shape == (30, 40, 3) and arr.dtype == np.uint8


def test_gif_uses_first_frame_and_rgba_converts():
    frames = [Image.new("P", (8, 8), i) for i in (1, 2)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert load_image(buf.getvalue()).shape == (8, 8, 3)
    assert load_image(Image.new("RGBA", (5, 4), (1, 2, 3, 0))).shape == (4, 5, 3)


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    arr = load_image(_encode(im, "JPEG", exif=exif))
    assert arr.shape == (40, 20, 3)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"definitely not an image", "not a supported image"),
        (_encode(Image.new("RGB", (64, 64), (9, 9, 9)), "PNG")[:60], "truncated|corrupt"),
        (_encode(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")[:200], "truncated|corrupt"),
    ],
)
def test_bad_image_bytes_raise_typed_errors(data, message):
    with pytest.raises(ImageError, match=message):
        load_image(data)


def test_pixel_limit_refuses_decompression_bombs():
    data = _encode(Image.new("L", (4000, 4000)), "PNG")
    with pytest.raises(ImageError, match="over the limit"):
        load_image(data, max_pixels=1_000_000)
    assert load_image(data, max_pixels=16_000_000).shape == (4000, 4000, 3)


def test_other_bad_inputs(tmp_path):
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="HxWx3 uint8"):
        load_image(np.zeros((4, 4), np.uint8))
    with pytest.raises(ImageError, match="unsupported image input"):
        load_image(12)


def test_small_config_tiles():
    cfg = VisionConfig(enc_dim=8, enc_n_heads=2, crop_size=56, overlap_margin=1, max_crops=4)
    crops = overlap_crops(np.zeros((200, 90, 3), np.uint8), cfg)
    th, tw = crops.tiling
    assert crops.pixels.shape == (1 + th * tw, 56, 56, 3) and th * tw <= 4
