"""pifi_jax: plug frozen LLM layers into small encoders, and fine-tune them cheaply, in JAX/Flax."""

from pifi_jax import (
    data,  # tasks, tokenizers, batching
    ist,  # IST / RST: the trainer's "ist" step plugin (config.ist)
    peft,  # parameter-efficient fine-tuning
    pifi,  # PiFi: pifi_jax.pifi.build, pifi_jax.pifi.select_layer
    train,  # objectives, steps, the training loop
)
from pifi_jax.generate import generate
from pifi_jax.hub import from_pretrained, save_pretrained
from pifi_jax.hub.layer import load_layer

__version__ = "0.1.0"
__all__ = [
    "data",
    "from_pretrained",
    "generate",
    "ist",
    "load_layer",
    "peft",
    "pifi",
    "save_pretrained",
    "train",
]
