"""The contract between prunevlm's packages: the export directory's manifest, the names of graphs and
tensors, the token layouts, the errors users see, and the checks every package shares.

Torch-free and light (numpy at most): the exporter writes what is defined here, the runtime, the engine
builder and the calibrator read it, and none of them imports another sideways for it.
"""
