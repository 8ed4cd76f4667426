"""Model families, one module each. A family module provides:

    NAME, DEFAULT_MODEL, SYNTHETIC        name, default checkpoint, built-in random-weight builders
    LAYOUTS, default_layout(keep, n)      --layout choices (CLI name -> runtime layout) and the default
    read_config(path) -> config           checks the checkpoint is of this family (cheap, no weights)
    method_spec(config, keep) -> MethodSpec
    load(path) -> (model, processor)      fp32, eval mode
    graphs(model, method) -> [GraphExport]
    decoder(model) -> (decoder, lm_head)  the LLM parts (embedding table, dims)
    modalities(model, processor, method, directory, layout) -> {name: ModalitySpec}
                                          placeholders, preprocessing and layout per input kind (may
                                          write extra files the layout needs into the export directory)
"""

from export.families import llava15, llava_next, video_llava

FAMILIES = {llava15.NAME: llava15, llava_next.NAME: llava_next, video_llava.NAME: video_llava}
