"""runtime.preprocess against transformers' own PIL processor, and load_image's conversions and errors."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data
from transformers.image_transforms import convert_to_rgb
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

import runtime.preprocess as preprocess_module
from contract.errors import ExportError, InputError, ManifestError
from export.processor import preprocess_spec
from runtime.preprocess import load_image, preprocess

ATOL = 1e-5

# The spec as it sits in a LLaVA-1.5 manifest (CLIP ViT-L/14-336), written out by hand.
CLIP_336_SPEC = {
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": 336},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 336, "width": 336},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def assert_close(actual: np.ndarray, expected: np.ndarray, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape, f"shape {actual.shape}, expected {expected.shape}"
    assert actual.dtype == np.float32, f"dtype {actual.dtype}, expected float32"
    diff = np.abs(actual.astype(np.float64) - expected)
    worst = np.unravel_index(diff.argmax(), diff.shape)
    assert diff.max() <= atol, (
        f"max |diff| {diff.max():.3g} > {atol} at {worst}: got {actual[worst]}, expected {expected[worst]}"
    )


def _with_alpha(rgb: np.ndarray) -> Image.Image:
    """RGBA with an alpha ramp from transparent (left) to opaque (right), so compositing shows."""
    alpha = np.broadcast_to(np.linspace(0, 255, rgb.shape[1]).astype(np.uint8), rgb.shape[:2])
    return Image.fromarray(np.dstack([rgb, alpha]))


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    """Real photos (landscape, square, portrait, tiny), then grayscale, RGBA and palette versions of one."""
    astronaut = data.astronaut()  # 512x512
    chelsea = Image.fromarray(data.chelsea())  # 451x300, landscape
    return [
        Image.fromarray(astronaut),
        chelsea,
        Image.fromarray(data.coffee()),
        Image.fromarray(data.rocket()),
        Image.fromarray(astronaut[:, 150:350]),  # portrait, 200x512
        Image.fromarray(astronaut[200:217, 230:270]),  # tiny, 40x17: upscaled
        chelsea.convert("L"),
        _with_alpha(data.chelsea()),
        chelsea.convert("P", palette=Image.Palette.ADAPTIVE),
    ]


def test_clip_336_spec_matches_transformers(pictures: list[Image.Image]) -> None:
    processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    expected = processor(pictures, return_tensors="np")["pixel_values"]
    assert_close(preprocess(pictures, CLIP_336_SPEC), expected)
    assert json.loads(json.dumps(preprocess_spec(processor))) == CLIP_336_SPEC


@pytest.mark.parametrize(
    "processor",
    [
        CLIPImageProcessorPil(),  # shortest_edge 224, crop 224
        CLIPImageProcessorPil(
            size={"height": 200, "width": 300},
            do_center_crop=False,
            resample=Image.Resampling.BILINEAR,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.25, 0.5, 1.0],
        ),
        CLIPImageProcessorPil(size={"shortest_edge": 100}, crop_size={"height": 127, "width": 91}),  # odd zero padding
        CLIPImageProcessorPil(do_rescale=False, do_normalize=False, resample=Image.Resampling.LANCZOS),
        LlavaImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
    ],
    ids=["clip-224", "height-width-no-crop", "crop-pads", "no-rescale-no-normalize", "llava-no-pad"],
)
def test_spec_round_trip_matches_transformers(pictures: list[Image.Image], processor: object) -> None:
    spec = json.loads(json.dumps(preprocess_spec(processor)))  # the manifest is JSON
    images = pictures if processor.do_center_crop or "height" in processor.size else pictures[:1]
    expected = processor(images, return_tensors="np")["pixel_values"].astype(np.float32)
    assert_close(preprocess(images, spec), expected)


@pytest.mark.parametrize(
    ("processor", "named"),
    [
        (LlavaImageProcessorPil(do_pad=True), "do_pad"),
        (CLIPImageProcessorPil(size={"longest_edge": 336}), "longest_edge"),
        (CLIPImageProcessorPil(size={"shortest_edge": 224, "longest_edge": 336}), "longest_edge"),
        (LlavaNextImageProcessorPil(), "overrides"),
        ("not a processor", "str"),
    ],
)
def test_spec_refuses_what_it_cannot_reproduce(processor: object, named: str) -> None:
    with pytest.raises(ExportError) as raised:
        preprocess_spec(processor)
    message = str(raised.value)
    assert type(processor).__name__ in message and named in message and "\n" not in message, message


def test_preprocess_refuses_bad_spec_and_batches(pictures: list[Image.Image]) -> None:
    with pytest.raises(ManifestError, match="image_std"):
        preprocess(pictures[:1], {key: value for key, value in CLIP_336_SPEC.items() if key != "image_std"})
    with pytest.raises(ManifestError, match="longest_edge"):
        preprocess(pictures[:1], {**CLIP_336_SPEC, "size": {"longest_edge": 336}})
    no_crop = {**CLIP_336_SPEC, "do_center_crop": False}
    with pytest.raises(InputError, match="different shapes"):
        preprocess(pictures[:2], no_crop)
    with pytest.raises(InputError, match="empty list"):
        preprocess([], CLIP_336_SPEC)


# --- load_image: conversions ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "1", "P", "LA", "RGBA", "CMYK", "P-transparent", "RGB-transparent"])
def test_load_image_converts_like_transformers(tmp_path: Path, mode: str) -> None:
    """Each mode loads from a file to the RGB that transformers' `convert_to_rgb` makes of it."""
    chelsea = data.chelsea()[:64, :96]
    rgba = _with_alpha(chelsea)
    if mode in ("LA", "RGBA"):
        image = rgba.convert(mode)
    elif mode == "P-transparent":
        image = Image.fromarray(chelsea).convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = int(np.asarray(image)[0, 0])
    elif mode == "RGB-transparent":
        image = Image.fromarray(chelsea)
        image.info["transparency"] = tuple(int(v) for v in chelsea[0, 0])
    else:
        image = Image.fromarray(chelsea).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path, **({"transparency": image.info["transparency"]} if "transparency" in image.info else {}))

    loaded = load_image(path)
    expected = convert_to_rgb(Image.open(path), return_numpy=True)
    assert loaded.mode == "RGB"
    difference = np.abs(np.asarray(loaded).astype(int) - expected)
    worst = np.unravel_index(difference.argmax(), difference.shape)
    assert difference.max() == 0, f"{mode}: max |diff| {difference.max()} at {worst}"
    if "A" in mode or "transparent" in mode:  # transparency really was composited onto white
        assert np.asarray(loaded)[0, 0].tolist() == [255, 255, 255]


def test_load_image_scales_16_bit_instead_of_clipping(tmp_path: Path) -> None:
    values = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    path = tmp_path / "sixteen.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"

    loaded = np.asarray(load_image(path))
    expected = np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=2)
    assert np.array_equal(loaded, expected), f"max diff {np.abs(loaded - expected.astype(int)).max()}"
    assert (np.asarray(Image.open(path).convert("RGB")) == 255).mean() > 0.9  # what naive conversion does

    big_endian = Image.frombytes("I;16B", (64, 64), values.astype(">u2").tobytes())
    assert np.array_equal(np.asarray(load_image(big_endian)), expected)

    Image.fromarray(values).save(path, transparency=int(values[0, 1]))  # tRNS: one 16-bit value is transparent
    expected[0, 1] = 255  # composited onto white
    assert np.array_equal(np.asarray(load_image(path)), expected)


def test_load_image_scales_16_bit_pgm_mode_i(tmp_path: Path) -> None:
    values = np.array([[0, 255, 256, 40000, 65535]], dtype=">u2")
    path = tmp_path / "sixteen.pgm"
    path.write_bytes(b"P5 5 1 65535\n" + values.tobytes())
    assert Image.open(path).mode == "I"
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 0, 1, 156, 255]


def test_load_image_refuses_float_and_wide_int_modes() -> None:
    with pytest.raises(InputError, match="mode F"):
        load_image(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)))
    with pytest.raises(InputError, match=r"mode I\) with values -1\.\.70000"):
        load_image(Image.fromarray(np.array([[-1, 70000]], dtype=np.int32)))


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    path = tmp_path / "rotated.jpg"
    Image.fromarray(data.chelsea()[:40, :60]).save(path, exif=exif)
    assert load_image(path).size == (40, 60)


def test_load_image_from_arrays() -> None:
    rgb = data.coffee()[:30, :50]
    assert np.array_equal(np.asarray(load_image(rgb)), rgb)
    gray = rgb[..., 0].copy()
    assert np.array_equal(np.asarray(load_image(gray)), np.repeat(gray[..., None], 3, axis=2))


# --- load_image: errors --------------------------------------------------------------------------------


def _assert_input_error(source: object, *named: str) -> None:
    with pytest.raises(InputError) as raised:
        load_image(source)
    message = str(raised.value)
    assert "\n" not in message, f"not one line: {message!r}"
    for text in named:
        assert text in message, f"{text!r} not in {message!r}"


def test_load_image_file_errors(tmp_path: Path) -> None:
    _assert_input_error(tmp_path / "missing.png", "missing.png", "not found")
    _assert_input_error(tmp_path, str(tmp_path), "not a file")
    text = tmp_path / "x.png"
    text.write_text("this is not a picture")
    _assert_input_error(str(text), str(text), "not an image")
    jpeg = tmp_path / "truncated.jpg"
    Image.fromarray(data.astronaut()).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    _assert_input_error(jpeg, str(jpeg), "truncated")


def _png_header(width: int, height: int) -> bytes:
    """A PNG with a real IHDR claiming width x height and no pixel data: a bomb that costs 57 bytes."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_load_image_refuses_too_many_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(100_000, 100_000))
    _assert_input_error(bomb, str(bomb), "too large")

    small = tmp_path / "small.png"
    Image.fromarray(data.chelsea()[:20, :20]).save(small)
    monkeypatch.setattr(preprocess_module, "MAX_PIXELS", 399)
    _assert_input_error(small, str(small), "20x20", "limit of 399")
    _assert_input_error(data.chelsea()[:20, :20], "(20, 20, 3)", "limit of 399")

    # PIL's own check only warns between its limit and twice it: that warning must not pass silently.
    monkeypatch.setattr(preprocess_module, "MAX_PIXELS", 10_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    _assert_input_error(small, str(small), "too large")


def test_load_image_refuses_bad_values() -> None:
    _assert_input_error(Image.new("RGB", (0, 4)), "0x4", "empty")
    _assert_input_error(np.zeros((0, 5, 3), np.uint8), "(0, 5, 3)", "empty")
    _assert_input_error(np.zeros((8, 8, 4), np.uint8), "(8, 8, 4)", "uint8")
    _assert_input_error(np.zeros((8, 8, 3), np.float32), "(8, 8, 3)", "float32")
    _assert_input_error(123, "int")
