"""Model families, one module each. A family module provides:

    NAME, DEFAULT_MODEL, SYNTHETIC        name, default checkpoint, built-in random-weight builders
    read_config(path) -> config           checks the checkpoint is of this family (cheap, no weights)
    method_spec(config, keep) -> MethodSpec
    load(path) -> (model, processor)      fp32, eval mode
    graphs(model, method) -> [GraphExport]
    decoder(model) -> (decoder, lm_head)  the LLM parts (embedding table, dims)
    modalities(model, processor, method, directory) -> {name: ModalitySpec}
                                          placeholders, preprocessing and layout per input kind (may
                                          write extra files the layout needs into the export directory)
"""

from export.families import llava15

FAMILIES = {llava15.NAME: llava15}
