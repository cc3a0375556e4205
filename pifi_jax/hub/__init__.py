"""Reading and writing Hugging Face checkpoints."""

from pifi_jax.hub.files import CheckpointReader, resolve_checkpoint
from pifi_jax.hub.pretrained import from_pretrained, save_pretrained

__all__ = ["CheckpointReader", "from_pretrained", "resolve_checkpoint", "save_pretrained"]
