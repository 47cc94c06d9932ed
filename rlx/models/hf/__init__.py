"""Hugging Face model directories: config, safetensors weights, tokenizer.

`from_pretrained(path)` -> (model, params, tokenizer); `save_pretrained`
writes the HF layout back. See `config` for the supported families.
"""

from rlx.models.hf.config import FAMILIES
from rlx.models.hf.config import transformer_config
from rlx.models.hf.pretrained import from_pretrained
from rlx.models.hf.pretrained import Pretrained
from rlx.models.hf.pretrained import save_pretrained
from rlx.models.hf.weights import load_params
from rlx.models.hf.weights import save_params
