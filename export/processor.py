"""Read a Hugging Face image processor's options into the manifest's plain-JSON preprocessing spec.

The runtime (`runtime.preprocess.preprocess`) reproduces transformers' PIL-backend pipeline (convert to RGB,
resize, center crop, rescale, normalize) and nothing else. A processor that does anything more is refused
here, at export time, instead of being preprocessed differently at run time without anyone noticing.
"""

from __future__ import annotations

from typing import Any

from contract.errors import ExportError

# transformers' processor classes are imported where they are read, not with this module: the export CLI imports
# it to list the families, and `--help` or a refused option should not wait seconds for transformers.

# The methods that make up PilBackend's pipeline: a subclass that overrides one of them processes differently.
_PIPELINE_METHODS = (
    "__call__",
    "preprocess",
    "_preprocess_image_like_inputs",
    "_prepare_image_like_inputs",
    "process_image",
    "convert_to_rgb",
    "_preprocess",
    "resize",
    "center_crop",
    "rescale",
    "normalize",
)
_SIZE_FORMS = ({"shortest_edge"}, {"height", "width"})


def preprocess_spec(image_processor: object) -> dict[str, Any]:
    """The spec with which `runtime.preprocess.preprocess` reproduces `image_processor` exactly.

    Accepts PIL-backend processors that run PilBackend's own pipeline (CLIPImageProcessorPil,
    LlavaImageProcessorPil without padding, ...). Raises ExportError naming the class and the option
    otherwise: the torchvision backend, a class with its own pipeline, `do_pad`, a size of another form.
    Options that are switched off are copied as they are and not checked.
    """
    from transformers.image_processing_backends import PilBackend
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    # Overrides known to be PilBackend's pipeline while `do_pad` is false (LLaVA's only adds padding to square).
    equivalent_overrides = {LlavaImageProcessorPil._preprocess}
    name = type(image_processor).__name__
    if not isinstance(image_processor, PilBackend):
        raise ExportError(
            f"image processor {name} is not a PIL-backend processor; load it with from_pretrained(..., backend='pil')"
        )
    for method in _PIPELINE_METHODS:
        function = getattr(type(image_processor), method)
        if function is not getattr(PilBackend, method) and function not in equivalent_overrides:
            raise ExportError(f"image processor {name} overrides {method}; only PilBackend's pipeline is reproduced")
    return _options_spec(image_processor)


def anyres_spec(image_processor: object) -> tuple[dict[str, Any], list[list[int]]]:
    """(per-tile spec, grid pinpoints) of a LLaVA-NeXT PIL processor, whose tiling `runtime.anyres`
    reproduces (the tiles then go through the ordinary spec; its `do_pad` pads the tile count of a
    batch, which the runtime does not need)."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    name = type(image_processor).__name__
    if type(image_processor) is not LlavaNextImageProcessorPil:
        raise ExportError(f"image processor {name} is not LlavaNextImageProcessorPil; its tiling is not reproduced")
    pinpoints = [[int(h), int(w)] for h, w in image_processor.image_grid_pinpoints]
    return _options_spec(image_processor, ignore_pad=True), pinpoints


def _options_spec(image_processor: object, ignore_pad: bool = False) -> dict[str, Any]:
    name = type(image_processor).__name__
    options = vars(image_processor)
    if options.get("do_pad") and not ignore_pad:
        raise ExportError(f"image processor {name} has do_pad=True (padding); the runtime reproduces no padding")
    spec = {
        "do_convert_rgb": bool(options["do_convert_rgb"]),
        "do_resize": bool(options["do_resize"]),
        "size": _size(options["size"]),
        "resample": options["resample"],
        "do_center_crop": bool(options["do_center_crop"]),
        "crop_size": _size(options["crop_size"]),
        "do_rescale": bool(options["do_rescale"]),
        "rescale_factor": float(options["rescale_factor"]),
        "do_normalize": bool(options["do_normalize"]),
        "image_mean": _per_channel(options["image_mean"]),
        "image_std": _per_channel(options["image_std"]),
    }
    if spec["do_resize"]:
        if set(spec["size"] or ()) not in _SIZE_FORMS:
            raise ExportError(
                f"image processor {name} has size {spec['size']}; "
                "only {shortest_edge} or {height, width} is reproduced"
            )
        if not isinstance(spec["resample"], int):
            raise ExportError(
                f"image processor {name} has resample {spec['resample']!r}; a PIL resampling code is needed"
            )
        spec["resample"] = int(spec["resample"])  # PILImageResampling is an IntEnum: store the plain code
    if spec["do_center_crop"] and set(spec["crop_size"] or ()) != {"height", "width"}:
        raise ExportError(
            f"image processor {name} has crop_size {spec['crop_size']}; only {{height, width}} is reproduced"
        )
    if spec["do_normalize"] and not len(spec["image_mean"] or ()) == len(spec["image_std"] or ()) == 3:
        raise ExportError(
            f"image processor {name} has image_mean {spec['image_mean']} and image_std {spec['image_std']}; "
            "3 values each are needed"
        )
    return spec


def _size(size: Any) -> dict[str, int] | None:
    """A SizeDict (or dict) as a plain dict of the entries that are set; None stays None."""
    if size is None:
        return None
    return {key: int(value) for key, value in dict(size).items() if value is not None}


def _per_channel(values: Any) -> list[float] | None:
    """Mean or std as a list of 3; transformers broadcasts a single number to every channel, so do we."""
    if values is None:
        return None
    if isinstance(values, (int, float)):
        return [float(values)] * 3
    return [float(value) for value in values]
