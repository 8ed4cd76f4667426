"""Every name two packages must agree on: graph roles, tensor roles, dynamic axes, KV-cache patterns.

The exporter writes graphs with these names, the manifest records them, the runtime, the engine builder
and the calibrator look them up. Defined once here; nowhere else spells them as string literals.
"""

# Graph keys in Manifest.graphs. A modality names its own vision and projector graphs (ModalitySpec);
# these are the ones the image modality uses and the single LLM graph.
VISION = "vision"
PROJECTOR = "projector"
LLM = "llm"


def llm_block(index: int) -> str:
    """Graph key of decoder block `index` of an export pruned inside the LLM (FEATHER, FastV): llm.0, llm.1, ..."""
    return f"{LLM}.{index}"


def select_graph(modality: str, stage: int) -> str:
    """Graph key of the token selection of prune stage `stage` (1, 2, ...) for one modality's window."""
    return f"select.{modality}.{stage}"

# Tensor roles of the three kinds of graph.
PIXEL_VALUES = "pixel_values"  # vision in:   [batch, 3, H, W] float32, preprocessed sub-images
IMAGE_FEATURES = "image_features"  # vision out:  [batch, N, C] feature-layer tokens ([CLS] dropped unless kept)
KEEP_INDICES = "keep_indices"  # vision out:  [batch, K] int64, kept patch indices, ascending
IMAGE_EMBEDS = "image_embeds"  # projector out: [batch, K, D] the kept tokens in the LLM's width
INPUTS_EMBEDS = "inputs_embeds"  # llm in: [batch, sequence, D]
ATTENTION_MASK = "attention_mask"  # llm in: [batch, total_sequence] int64, 0 at left padding
POSITION_IDS = "position_ids"  # llm in: [batch, sequence] int64
LOGITS = "logits"  # llm out: [batch, V] next-token logits of the last position
# In-LLM pruning (FEATHER, FastV): a decoder block that ends at a prune point outputs its hidden states and
# the last token's attention logits for the next layer; a select graph turns the image tokens' logits into
# the kept slots.
HIDDEN_STATES = "hidden_states"  # llm block out: [batch, sequence, D], the next block's inputs_embeds
PRUNE_LOGITS = "prune_logits"  # llm block out: [batch, H, sequence] float32, last token's q.k/sqrt(d) per head
WINDOW_LOGITS = "window_logits"  # select in: [batch, H, n] the prune logits of the window's image tokens
WINDOW_VALID = "window_valid"  # select in: [batch, n] int64, 1 = a real token of the window, 0 = empty slot
KEEP_SLOTS = "keep_slots"  # select out: [batch, slots] int64, kept window indices ascending, then filler
KEEP_VALID = "keep_valid"  # select out: [batch, slots] int64, 1 = kept, 0 = filler (never attended)

# Dynamic axis names (a shape entry is an int when static, one of these names when dynamic).
BATCH = "batch"
SEQUENCE = "sequence"  # new tokens fed to the LLM in one call (prompt length at prefill, 1 when decoding)
PAST = "past_sequence"  # tokens already in the KV cache
TOTAL = "total_sequence"  # PAST + SEQUENCE: the attention mask's length
CAPACITY = "cache_capacity"  # positions a preallocated KV buffer holds (>= TOTAL; `llm.kv_cache` "buffer")

# KV-cache tensor names of the LLM graph, formatted with the layer index.
PAST_KEY, PAST_VALUE = "past_key_values.{}.key", "past_key_values.{}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{}.key", "present.{}.value"

# Modalities (content types of the chat template).
IMAGE = "image"
VIDEO = "video"
