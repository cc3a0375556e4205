"""Model families (one file each) and the registry that maps Hugging Face model types to them."""

from pifi_jax.models.bert import BertConfig, BertEncoder, BertForSequenceClassification
from pifi_jax.models.registry import family_for, supported_model_types

__all__ = [
    "BertConfig",
    "BertEncoder",
    "BertForSequenceClassification",
    "family_for",
    "supported_model_types",
]
