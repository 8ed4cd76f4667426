"""Video-LLaVA (HF `VideoLlavaForConditionalGeneration`): two CLIP towers (image, video) sharing one MLP
projector and one Llama LLM, with FasterVLM's [CLS]-attention pruning applied per image and per frame.

What transformers 5.23 does, and what we export:

- image: the image tower, hidden_states[-2] with [CLS] dropped ('default' strategy): 256 tokens of a
  224 px image, projected. The `vision` graph is LLaVA-1.5's (top-K of 256) and the layout `single`.
- video: the frames go through the *video* tower one by one (a batch of frames; no temporal attention in
  the HF port), hidden_states[-2] of every frame **with its [CLS] token** (HF ignores the feature strategy
  for videos), projected: 8 x 257 = 2056 tokens, frame after frame, [CLS] then the patches in raster order.
  The original Video-LLaVA ('patch' features) and FasterVLM's code drop [CLS]: 8 x 256 = 2048.
- K = 256 (no pruning) follows HF exactly: `video_vision` returns all 257 rows of the feature layer and
  `video_projector` projects [CLS] + the 256 patches of each frame (2056 tokens for 8 frames).
- K < 256 follows FasterVLM's Video-LLaVA code: per frame, the [CLS] row of layer -2's attention (softmax
  over all 257 keys, patch columns, mean over heads), top-K, sorted, gathered, projected; [CLS] dropped:
  8 x K tokens (K = 64 / 26 / 13 for 75 / 90 / 95 %). `video_vision` is then LLaVA-1.5's vision graph on the
  video tower and both modalities share the `projector` graph.
  In both cases keep_indices are patch indices (0..255, raster order), as for images.

Preprocessing: transformers' video processor needs torchvision (its only backend), which has no CPU build
here. The runtime resizes frames with PIL using the image processor's options (VideoLlavaImageProcessor's
pipeline, which the parity tests compare against); released checkpoints use the same options for videos
(checked at export time when the checkpoint has a video_preprocessor_config.json). Torchvision's bicubic
resize differs from PIL's at rounding level; that difference is not reproduced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from contract import names
from contract.errors import ExportError, ManifestError
from contract.layouts import FramesLayout, SingleLayout
from contract.manifest import GraphSpec, MethodSpec, ModalitySpec, TensorSpec
from contract.names import BATCH
from export import checkpoints, llm, pruning, reference, synthetic
from export.families import llava15
from export.graph import GraphExport, Tolerance
from runtime.preprocess import check_spec

NAME = "video-llava"
DEFAULT_MODEL = "LanguageBind/Video-LLaVA-7B-hf"
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
NUM_FRAMES = 8  # Video-LLaVA's LanguageBind video tower was trained on 8 frames per clip
LAYOUTS = {"frames": FramesLayout}  # the video's layout; images always use `single`
KEEP_HELP = "1..256 per frame and per image, the paper uses 64 / 26 / 13"
LAYOUT_HELP = {"frames": "8 frames, K kept per frame"}
VIDEO_CONFIG = "video_preprocessor_config.json"
VIDEO_VISION, VIDEO_PROJECTOR = "video_vision", "video_projector"  # the video modality's graphs

# The built-in models' template (a released checkpoint brings its own, read by `load`): llava-hf's LLaVA-1.5
# template with a `video` block, rendering "USER: <video>\n{text} ASSISTANT:", the prompt format of
# transformers' Video-LLaVA docs and tests.
CHAT_TEMPLATE = llava15.CHAT_TEMPLATE.replace(
    "{# Render all text next #}",
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}{# Render all text next #}",
)


def default_layout(keep: int, num_patches: int) -> str:
    return "frames"


@dataclass(frozen=True)
class Processor:
    """The parts of HF's VideoLlavaProcessor the exporter needs. The processor class itself cannot be built
    without torchvision (its video processor requires it), so the checkpoint's files are read one by one."""

    tokenizer: Any
    image_processor: Any  # VideoLlavaImageProcessor (numpy/PIL, no torchvision)
    chat_template: str
    video_options: dict  # video_preprocessor_config.json as saved, or {} when the checkpoint has none
    image_token: str = IMAGE_TOKEN
    video_token: str = VIDEO_TOKEN


# --- built-in random-weight checkpoints -------------------------------------------------------------

def _build_synthetic(directory: Path, *, vision: dict, text: dict, seed: int) -> None:
    """A Video-LLaVA-shaped checkpoint with random weights: two CLIP 224/14 towers (256 patches + [CLS],
    feature layer -2, sharpened attention), a Llama LLM, SmolLM2's tokenizer with <image> and <video>, and
    the processor files a released checkpoint has (written directly: see `Processor`)."""
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration, VideoLlavaImageProcessor

    tokenizer = synthetic.smollm2_tokenizer([IMAGE_TOKEN, VIDEO_TOKEN])
    tokenizer.padding_side = "left"
    vision_config, text_config = synthetic.tower_configs(tokenizer, vision, text, image_size=224, max_positions=4096)
    config = VideoLlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    synthetic.save_random_model(VideoLlavaForConditionalGeneration, config, tokenizer, directory, seed,
                                lambda model: [model.model.image_tower, model.model.video_tower], llm=text)
    tokenizer.save_pretrained(directory)
    image_processor = VideoLlavaImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    image_processor.save_pretrained(directory)
    video_options = {k: v for k, v in image_processor.to_dict().items() if k in _VIDEO_KEYS}
    video_options.update(video_processor_type="VideoLlavaVideoProcessor", do_sample_frames=False)
    (directory / VIDEO_CONFIG).write_text(json.dumps(video_options, indent=2) + "\n")
    (directory / "processor_config.json").write_text(json.dumps({
        "processor_class": "VideoLlavaProcessor", "patch_size": 14, "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1, "image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN,
    }, indent=2) + "\n")
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)


SYNTHETIC = synthetic.builders(_build_synthetic, seed=2)


# --- checkpoint -------------------------------------------------------------------------------------

def read_config(path: Path):
    return llava15.read_config(path, model_type="video_llava")


def load(path: Path):
    """Model (fp32, eval, SDPA attention) and the processor parts from a checkpoint directory."""
    from transformers import AutoTokenizer, VideoLlavaForConditionalGeneration, VideoLlavaImageProcessor

    model = checkpoints.load_model(VideoLlavaForConditionalGeneration, path)
    with checkpoints.reading(path, "processor (tokenizer, image processor)"):
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = VideoLlavaImageProcessor.from_pretrained(path)
    extra = _read_json(path / "processor_config.json")
    processor = Processor(
        tokenizer=tokenizer,
        image_processor=image_processor,
        chat_template=_chat_template(path, extra, tokenizer),
        video_options=_read_json(path / VIDEO_CONFIG),
        image_token=extra.get("image_token", IMAGE_TOKEN),
        video_token=extra.get("video_token", VIDEO_TOKEN),
    )
    for token, expected in ((processor.image_token, model.config.image_token_id),
                            (processor.video_token, model.config.video_token_id)):
        if tokenizer.convert_tokens_to_ids(token) != expected:
            raise ExportError(f"the tokenizer maps {token!r} to {tokenizer.convert_tokens_to_ids(token)}, the model "
                              f"config expects token id {expected}")
    return model.eval(), processor


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from None


def _chat_template(path: Path, processor_config: dict, tokenizer) -> str:
    """Where transformers keeps a processor's template: chat_template.jinja (5.x), chat_template.json (4.4x
    checkpoints), processor_config.json, else the tokenizer's."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    template = _read_json(path / "chat_template.json").get("chat_template") or processor_config.get("chat_template")
    template = template or tokenizer.chat_template
    if not template:
        raise ExportError(f"{path} has no chat template (chat_template.jinja/.json); the runtime needs one")
    return template


method_spec = llava15.method_spec
decoder = llava15.decoder


# --- graphs --------------------------------------------------------------------------------------------

class FullFeaturesVisionGraph(llava15.VisionGraph):
    """LLaVA-1.5's vision graph, but image_features keeps the [CLS] row: [B, 1+N, C], as HF's
    `get_video_features` takes hidden_states[-2] of every frame whole. keep_indices: patch indices."""

    def forward(self, pixel_values: torch.Tensor):
        hidden = self.tower.pre_layrnorm(self.tower.embeddings(pixel_values))  # [B, 1+N, C]
        for layer in self.layers[:-1]:
            hidden = layer(hidden, None)
        scores = self.cls_scores(hidden)  # [B, N]
        return self.layers[-1](hidden, None), pruning.topk_sorted(scores, self.keep)  # [B, 1+N, C], [B, K]


class ClsProjectorGraph(nn.Module):
    """HF's unpruned video tokens of a frame: [CLS] first, then the kept patches, all projected.

        image_features [B, 1+N, C] --+--> [:, :1] ([CLS]) -----------------+--> concat --> projector --> [B, 1+K, D]
        keep_indices   [B, K] -------+--> gather from [:, 1:] (patches) ---+
    """

    def __init__(self, projector: nn.Module):
        super().__init__()
        self.projector = projector

    def forward(self, image_features: torch.Tensor, keep_indices: torch.Tensor) -> torch.Tensor:
        kept = pruning.gather_tokens(image_features[:, 1:], keep_indices)  # [B, K, C]
        return self.projector(torch.cat([image_features[:, :1], kept], dim=1))  # [B, 1+K, D]


def _keeps_cls(method: MethodSpec) -> bool:
    """Unpruned video follows HF ([CLS] per frame); pruned video follows FasterVLM ([CLS] dropped), and so
    does in-LLM pruning (FEATHER, FastV): its window is the frames' patches, 8 x 256, as the original
    Video-LLaVA's 'patch' features."""
    return method.name == "none"


def graphs(model, method: MethodSpec) -> list[GraphExport]:
    vc = model.config.vision_config
    feature = llava15._feature_layer(model.config)
    n, k, c, d = method.num_patches, method.keep, vc.hidden_size, model.config.text_config.hidden_size
    side = vc.image_size
    tol = {names.IMAGE_FEATURES: Tolerance(1e-4, 1e-4)}

    def vision(name: str, tower, rows: int, module_class) -> GraphExport:
        spec = GraphSpec(
            file=f"{name}.onnx",
            inputs=(TensorSpec(names.PIXEL_VALUES, "float32", (BATCH, 3, side, side)),),
            outputs=(TensorSpec(names.IMAGE_FEATURES, "float32", (BATCH, rows, c)),
                     TensorSpec(names.KEEP_INDICES, "int64", (BATCH, k))),
        )

        def example(seed: int) -> dict:
            return {names.PIXEL_VALUES: torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(seed))}

        return GraphExport(name, module_class(tower, feature, k).eval(), spec, example, tolerances=tol,
                           set_outputs=(names.KEEP_INDICES,))

    def projector(name: str, rows: int, out: int, module: nn.Module) -> GraphExport:
        spec = GraphSpec(
            file=f"{name}.onnx",
            inputs=(TensorSpec(names.IMAGE_FEATURES, "float32", (BATCH, rows, c)),
                    TensorSpec(names.KEEP_INDICES, "int64", (BATCH, k))),
            outputs=(TensorSpec(names.IMAGE_EMBEDS, "float32", (BATCH, out, d)),),
        )

        def example(seed: int) -> dict:
            gen = torch.Generator().manual_seed(seed)
            indices = torch.stack([torch.randperm(n, generator=gen)[:k].sort().values for _ in range(2)])
            return {names.IMAGE_FEATURES: torch.randn(2, rows, c, generator=gen), names.KEEP_INDICES: indices}

        return GraphExport(name, module.eval(), spec, example, tolerances={names.IMAGE_EMBEDS: Tolerance(1e-4, 1e-4)})

    projector_module = model.model.multi_modal_projector
    exports = [
        vision(names.VISION, model.model.image_tower, n, llava15.VisionGraph),
        projector(names.PROJECTOR, n, k, llava15.ProjectorGraph(projector_module)),
    ]
    if _keeps_cls(method):
        exports += [vision(VIDEO_VISION, model.model.video_tower, 1 + n, FullFeaturesVisionGraph),
                    projector(VIDEO_PROJECTOR, 1 + n, 1 + k, ClsProjectorGraph(projector_module))]
    else:
        exports.append(vision(VIDEO_VISION, model.model.video_tower, n, llava15.VisionGraph))
    text_decoder, lm_head = decoder(model)
    llm_graph_spec, _ = llm.llm_spec(text_decoder, lm_head, "llm.onnx")
    return exports + [llm.graph_export(text_decoder, lm_head, llm_graph_spec)]


# --- manifest ------------------------------------------------------------------------------------------

# Options of VideoLlavaImageProcessor's pipeline, in the runtime's spec names (runtime.preprocess.SPEC_KEYS).
_VIDEO_KEYS = ("do_convert_rgb", "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
               "rescale_factor", "do_normalize", "image_mean", "image_std")


def preprocess_spec(image_processor) -> dict:
    """The runtime spec reproducing VideoLlavaImageProcessor: convert (PIL inputs), PIL resize, center crop,
    rescale, normalize, the same steps as runtime.preprocess. Any other class is refused: it may differ."""
    from transformers import VideoLlavaImageProcessor

    if type(image_processor) is not VideoLlavaImageProcessor:
        raise ExportError(f"image processor {type(image_processor).__name__} is not VideoLlavaImageProcessor; "
                          "its pipeline is not reproduced")
    options = vars(image_processor)
    spec: dict[str, Any] = {key: options[key] for key in _VIDEO_KEYS}
    spec["size"] = {key: int(v) for key, v in dict(spec["size"]).items() if v is not None}
    spec["crop_size"] = {key: int(v) for key, v in dict(spec["crop_size"]).items() if v is not None}
    spec["resample"] = int(spec["resample"])
    spec["rescale_factor"] = float(spec["rescale_factor"])
    for key in ("image_mean", "image_std"):
        values = spec[key]
        spec[key] = [float(values)] * 3 if isinstance(values, (int, float)) else [float(v) for v in values]
    for key in ("do_convert_rgb", "do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        spec[key] = bool(spec[key])
    try:
        check_spec(spec)
    except ManifestError as exc:  # the runtime's own check, here about the processor's options
        raise ExportError(f"image processor options are not reproducible: {exc}") from None
    return spec


def _check_video_options(video_options: dict, spec: dict) -> None:
    """The video processor (torchvision-backed, never used here) must use the options the runtime applies to frames."""
    for key in _VIDEO_KEYS:
        if key not in video_options:
            continue
        value = video_options[key]
        expected = spec[key]
        if isinstance(expected, dict):
            value = {k: v for k, v in dict(value).items() if v is not None}
        if isinstance(expected, list):
            value = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * 3
        if value != expected:
            raise ExportError(f"{VIDEO_CONFIG} has {key}={value!r} but the image processor has {expected!r}; "
                              "frames would be preprocessed differently than the runtime does")


def modalities(model, processor: Processor, method: MethodSpec, directory: Path,
               layout: str) -> dict[str, ModalitySpec]:
    """An image: one sub-image (`single`). A video: NUM_FRAMES frames (`frames`), each its own sub-image."""
    spec = preprocess_spec(processor.image_processor)
    _check_video_options(processor.video_options, spec)
    side = model.config.vision_config.image_size
    if spec["do_center_crop"] and spec["crop_size"] != {"height": side, "width": side}:
        raise ExportError(f"the processor crops to {spec['crop_size']}, the vision towers take {side}x{side}")
    tokenizer = processor.tokenizer
    keeps_cls = _keeps_cls(method)
    return {
        "image": ModalitySpec(
            placeholder=processor.image_token,
            placeholder_id=int(tokenizer.convert_tokens_to_ids(processor.image_token)),
            content_type="image", vision=names.VISION, projector=names.PROJECTOR, preprocess=spec,
            layout=SingleLayout(),
        ),
        "video": ModalitySpec(
            placeholder=processor.video_token,
            placeholder_id=int(tokenizer.convert_tokens_to_ids(processor.video_token)),
            content_type="video", vision=VIDEO_VISION, preprocess=spec, layout=LAYOUTS[layout](num_frames=NUM_FRAMES),
            projector=VIDEO_PROJECTOR if keeps_cls else names.PROJECTOR,
        ),
    }


# --- PyTorch reference (tests and benchmarks compare the graphs with it) ---------------------------

def reference_tokens(model, pixel_values_videos: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FasterVLM's Video-LLaVA tokens the reference way (its `encode_videos`): every frame through the video
    tower with eager attention, layer -2's [CLS] row over the patches, mean over heads, top-k per frame,
    sorted, [CLS] dropped, gathered and projected, frames in order.

    pixel_values_videos [B, F, 3, H, W] -> (tokens [B, F*K, D], kept indices [B, F, K])."""
    batch, frames = pixel_values_videos.shape[:2]
    features, indices = reference.hf_selection(model, pixel_values_videos.flatten(0, 1), keep, tower=model.model.video_tower)
    with torch.no_grad():
        tokens = model.model.multi_modal_projector(pruning.gather_tokens(features, indices))  # [B*F, K, D]
    return tokens.reshape(batch, frames * keep, -1), indices.reshape(batch, frames, keep)
