"""Models: the transformer, its KV cache, tokenizers and HF loading."""

from rlx.models.hf import from_pretrained
from rlx.models.hf import save_pretrained
