"""Video-LLaVA exports against Hugging Face transformers (unpruned: HF's own layout, [CLS] + 256 patches per
frame) and against a PyTorch reference of FasterVLM's per-frame pruning, on a short clip made from real
photos, given as a list of frames and as video files written with PyAV.

HF inputs are built the way `VideoLlavaProcessor` builds them (its video processor needs torchvision, which
has no CPU build here): the chat template, each placeholder repeated as many times as the processor's
`replace_image_token` / `replace_video_token` compute, pixel values from VideoLlavaImageProcessor per frame.
Tolerances: greedy tokens identical, logits within LOGIT_ATOL (fp32 on both sides), the LLM's input
sequence within EMBED_ATOL, preprocessed pixels within PIXEL_ATOL, kept index sets identical.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from contract.errors import InputError
from export import checkpoints, reference
from export.families import video_llava
from runtime.pipeline import Pipeline, Timings
from tests.export.test_llava15_parity import NEW_TOKENS, assert_same_generation
from tests.helpers import PROMPTS, assert_one_line, assert_refused, cli

EMBED_ATOL = 1e-4
PIXEL_ATOL = 1e-6
UNPRUNED = 256  # 16x16 patches of a 224 px frame


# --- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf():
    path = checkpoints.for_family(video_llava, "tiny")
    model, processor = video_llava.load(path)
    processor.tokenizer.padding_side = "left"
    return path, model, processor


@pytest.fixture(scope="module")
def video_pipeline(export_dir):
    """keep -> Pipeline of the tiny Video-LLaVA export at that K."""
    made = {}

    def get(keep: int) -> Pipeline:
        if keep not in made:
            made[keep] = Pipeline.load(export_dir(video_llava.NAME, keep))
        return made[keep]

    return get


def pan(photo: np.ndarray, steps: int) -> list[np.ndarray]:
    """A slow horizontal pan over a photo: `steps` 240x320 frames."""
    height, width = photo.shape[:2]
    crop = int(width * 0.75)
    return [np.asarray(Image.fromarray(photo[:, x:x + crop]).resize((320, 240), Image.Resampling.BILINEAR))
            for x in np.linspace(0, width - crop, steps).astype(int)]


@pytest.fixture(scope="module")
def clips(photos) -> dict[str, list[np.ndarray]]:
    """Two clips of real photos: 12 frames (3 shots) and 16 frames (2 shots); both longer than 8 frames, so
    the runtime's uniform sampling matters."""
    return {
        "a": pan(photos["astronaut"], 4) + pan(photos["chelsea"], 4) + pan(photos["coffee"], 4),
        "b": pan(photos["rocket"], 8) + pan(photos["chelsea"][:, ::-1], 8),
    }


def write_video(path: Path, frames: list[np.ndarray], codec: str, pix_fmt: str) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, clips) -> dict[str, Path]:
    """clip a as H.264 MP4 (lossy), FFV1 AVI (lossless RGB) and FFV1 MKV (lossless; no frame count in the
    container, so the runtime counts frames by decoding); a 5-frame MP4."""
    root = tmp_path_factory.mktemp("videos")
    return {
        "mp4": write_video(root / "clip.mp4", clips["a"], "libx264", "yuv420p"),
        "avi": write_video(root / "clip.avi", clips["a"], "ffv1", "bgr0"),
        "mkv": write_video(root / "clip.mkv", clips["a"], "ffv1", "bgr0"),
        "short": write_video(root / "short.mp4", clips["a"][:5], "libx264", "yuv420p"),
    }


# --- HF inputs, built as VideoLlavaProcessor builds them ---------------------------------------------

def sampled(frames: list[np.ndarray]) -> list[np.ndarray]:
    return [frames[i] for i in np.linspace(0, len(frames) - 1, video_llava.NUM_FRAMES).astype(int)]


def hf_pixels(processor, images: list) -> torch.Tensor:
    return processor.image_processor(images, return_tensors="pt", return_legacy_image_output=False)["pixel_values"]


def hf_inputs(model, processor, prompts: list[str], kind: str) -> dict:
    patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    # VideoLlavaProcessor: an image is its patches ([CLS] dropped by the 'default' strategy); a video is
    # (patches + [CLS]) per frame.
    count, token = {"image": (patches, processor.image_token),
                    "video": ((patches + 1) * video_llava.NUM_FRAMES, processor.video_token)}[kind]
    texts = [
        processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": p}]}],
            chat_template=processor.chat_template, add_generation_prompt=True, tokenize=False,
        ).replace(token, token * count)
        for p in prompts
    ]
    return dict(processor.tokenizer(texts, return_tensors="pt", padding=True))


def hf_generate(model, **inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)


# --- parity --------------------------------------------------------------------------------------------

def test_frames_sampling_and_preprocessing_match_hf(hf, video_pipeline, clips, files):
    """Every way of giving a clip yields the pixels HF's processor makes of the linspace-sampled frames."""
    import av

    _, _, processor = hf
    frames = video_pipeline(UNPRUNED).layouts["video"]
    expected = hf_pixels(processor, sampled(clips["a"])).numpy()
    ours, size = frames.tiles(clips["a"])
    worst = float(np.abs(ours - expected).max())
    print(f"list of frames vs VideoLlavaImageProcessor: worst pixel difference {worst:.2e}")
    assert worst <= PIXEL_ATOL and size == (240, 320)
    for name in ("avi", "mkv"):  # lossless: decoding must give back exactly the frames written
        np.testing.assert_array_equal(frames.tiles(files[name])[0], ours, err_msg=f"{name} file")
    np.testing.assert_array_equal(frames.tiles(np.stack(clips["a"]))[0], ours, err_msg="[T, H, W, 3] array")
    with av.open(str(files["mp4"])) as container:  # lossy: compare with the frames PyAV decodes
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    worst = float(np.abs(frames.tiles(files["mp4"])[0] - hf_pixels(processor, sampled(decoded)).numpy()).max())
    print(f"mp4 file vs VideoLlavaImageProcessor on PyAV's frames: worst pixel difference {worst:.2e}")
    assert worst <= PIXEL_ATOL


@pytest.mark.parametrize("names", [["a"], ["b", "a"]], ids=["batch1", "batch2"])
def test_unpruned_video_matches_hf_generate(names, hf, video_pipeline, clips):
    """K=256: HF's layout ([CLS] + 256 patches per frame, 8 frames) through the runtime == HF generate."""
    _, model, processor = hf
    pipe = video_pipeline(UNPRUNED)
    prompts = [PROMPTS[0], PROMPTS[2]][: len(names)]
    inputs = hf_inputs(model, processor, prompts, "video")
    videos = torch.stack([hf_pixels(processor, sampled(clips[n])) for n in names])  # [B, 8, 3, 224, 224]
    out = hf_generate(model, **inputs, pixel_values_videos=videos)
    results = pipe.generate([clips[n] for n in names], prompts, max_new_tokens=NEW_TOKENS, return_logits=True,
                            modality="video")
    assert_same_generation(results, out.sequences[:, inputs["input_ids"].shape[1]:], out.logits,
                           set(pipe.manifest.llm.eos_token_ids))
    for row, result in enumerate(results):
        assert result.kept_indices.shape == (video_llava.NUM_FRAMES, UNPRUNED)
        assert result.prompt_tokens == int(inputs["attention_mask"][row].sum())


def test_unpruned_image_matches_hf_generate(hf, video_pipeline, photos):
    """An image goes through the image tower, 256 tokens ([CLS] dropped), as in HF."""
    _, model, processor = hf
    pipe = video_pipeline(UNPRUNED)
    inputs = hf_inputs(model, processor, [PROMPTS[1]], "image")
    out = hf_generate(model, **inputs, pixel_values=hf_pixels(processor, [photos["chelsea"]]))
    results = pipe.generate([photos["chelsea"]], [PROMPTS[1]], max_new_tokens=NEW_TOKENS, return_logits=True)
    assert_same_generation(results, out.sequences[:, inputs["input_ids"].shape[1]:], out.logits,
                           set(pipe.manifest.llm.eos_token_ids))
    assert results[0].prompt_tokens == int(inputs["attention_mask"][0].sum())


@pytest.mark.parametrize("keep", [13, 26, 64])
def test_pruned_video_matches_fastervlm_reference(keep, hf, video_pipeline, clips, photos):
    """Per-frame kept indices == selection from HF's eager attention maps of the video tower; the sequence the
    runtime hands the LLM == the PyTorch reference of FasterVLM's layout (K per frame, [CLS] dropped, frame
    order); greedy tokens and logits == HF generate on that reference sequence. Batch 2."""
    _, model, processor = hf
    pipe = video_pipeline(keep)
    names, prompts = ["a", "b"], [PROMPTS[0], PROMPTS[2]]
    inputs = hf_inputs(model, processor, prompts, "video")
    videos = torch.stack([hf_pixels(processor, sampled(clips[n])) for n in names])
    tokens, indices = video_llava.reference_tokens(model, videos, keep)  # [B, 8K, D], [B, 8, K]
    rows = [reference.replace_placeholder_run(model, ids[mask.bool()], row, token_id=model.config.video_token_id)
            for ids, mask, row in zip(inputs["input_ids"], inputs["attention_mask"], tokens)]

    timings = Timings()
    visual, kept = pipe.encode([clips[n] for n in names], "video", timings)
    ids = [pipe.prompt_ids(p, "video") for p in prompts]
    embeds, mask = pipe.splice(ids, visual, "video")
    for row, expected in enumerate(rows):
        assert kept[row].tolist() == indices[row].tolist(), f"clip {names[row]}: kept sets differ at K={keep}"
        ours = embeds[row][mask[row] == 1]
        assert ours.shape == tuple(expected.shape), f"LLM input {ours.shape} != reference {tuple(expected.shape)}"
        worst = float(np.abs(ours - expected.numpy()).max())
        print(f"K={keep} clip {names[row]}: LLM input sequence worst difference {worst:.2e}")
        assert worst <= EMBED_ATOL

    length = max(len(r) for r in rows)
    padded = torch.zeros(len(rows), length, rows[0].shape[1])
    attention = torch.zeros(len(rows), length, dtype=torch.long)
    for row, r in enumerate(rows):
        padded[row, length - len(r):], attention[row, length - len(r):] = r, 1
    out = hf_generate(model, inputs_embeds=padded, attention_mask=attention)
    results = pipe.generate([clips[n] for n in names], prompts, max_new_tokens=NEW_TOKENS, return_logits=True,
                            modality="video")
    assert_same_generation(results, out.sequences, out.logits, set(pipe.manifest.llm.eos_token_ids))

    # The image tower is pruned with the same K.
    pixel_values = hf_pixels(processor, [photos["astronaut"], photos["portrait"]])
    _, expected = reference.hf_selection(model, pixel_values, keep, tower=model.model.image_tower)
    got = pipe.runners["vision"].infer({"pixel_values": pixel_values.numpy()})["keep_indices"]
    assert got.tolist() == expected.tolist(), f"image kept sets differ at K={keep}"


# --- bad input -----------------------------------------------------------------------------------------

def test_bad_video_input_is_refused(hf, video_pipeline, clips, files, photos, tmp_path):
    """One line naming the value, through the API; nothing is written anywhere."""
    pipe = video_pipeline(13)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    still = tmp_path / "photo.png"
    Image.fromarray(photos["coffee"]).save(still)
    before = sorted(tmp_path.iterdir())
    cases = [
        (garbage, ["cannot decode video file", str(garbage)]),
        (files["short"], [str(files["short"]), "has 5 frames", "samples 8 frames"]),
        (clips["a"][:3], ["list of 3 frames", "samples 8 frames"]),
        (np.stack(clips["a"][:7]), ["(7, 240, 320, 3)", "samples 8 frames"]),
        (still, [str(still), "still image", "--image"]),
        (photos["coffee"], ["single image", "(400, 600, 3)"]),
        (tmp_path / "missing.mp4", ["video file not found", "missing.mp4"]),
    ]
    for source, named in cases:
        with pytest.raises(InputError) as error:
            pipe.generate(source, PROMPTS[0], max_new_tokens=2, modality="video")
        assert_one_line(error, *named)
    with pytest.raises(InputError) as error:  # a video where an image is expected
        pipe.generate(files["mp4"], PROMPTS[0], max_new_tokens=2)
    assert_one_line(error, "cannot read image file", str(files["mp4"]))
    assert sorted(tmp_path.iterdir()) == before


def test_cli_video(hf, video_pipeline, clips, files, tmp_path):
    """--video answers like the API; --video on an image-only export, both flags, or an undecodable file:
    exit 2 with one line, no output file written."""
    pipe = video_pipeline(13)
    run = cli("runtime", pipe.directory, "--video", files["mkv"], "--prompt", PROMPTS[0], "--max-new-tokens", "4",
              "--json", "--save-kept", tmp_path / "kept.png")
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["token_ids"] == pipe.generate(clips["a"], PROMPTS[0], max_new_tokens=4, modality="video").token_ids
    assert np.array(answer["kept_indices"]).shape == (video_llava.NUM_FRAMES, 13)
    assert Image.open(tmp_path / "kept.png").size == (video_llava.NUM_FRAMES * 224, 224)

    image_only = tmp_path / "image-only"
    shutil.copytree(pipe.directory, image_only)
    manifest = json.loads((image_only / "manifest.json").read_text())
    del manifest["modalities"]["video"]
    (image_only / "manifest.json").write_text(json.dumps(manifest))
    refused = tmp_path / "refused.png"
    assert_refused(cli("runtime", image_only, "--video", files["mp4"], "--prompt", "x", "--save-kept", refused),
                   "--video", "image input only")
    assert_refused(cli("runtime", pipe.directory, "--video", files["mp4"], "--image", files["mp4"], "--prompt", "x"),
                   "--image", "--video")
    garbage = tmp_path / "clip.webm"
    garbage.write_text("not a video")
    assert_refused(cli("runtime", pipe.directory, "--video", garbage, "--prompt", "x", "--save-kept", refused),
                   "cannot decode video file", str(garbage))
    assert not refused.exists()
