"""Short names of the paper's small encoders (SLMs) and LLMs; anything else is taken as a path.

resolve_slm("bert") == "bert-base-uncased";  resolve_llm("/data/my-llm") == "/data/my-llm"
"""

from __future__ import annotations

# The paper's SLMs, plus the offline MiniLM.
SLMS = {
    "bert": "bert-base-uncased",
    "roberta": "roberta-base",
    "albert": "albert-base-v2",
    "electra": "google/electra-base-discriminator",
    "deberta": "microsoft/deberta-base",
    "debertav3": "microsoft/deberta-v3-base",
    "minilm": "asset:minilm",
    # Decoder SLMs (classification on the last real token; causal generation).
    "smollm2": "asset:smollm2",
    "qwen2.5-coder-0.5b": "asset:qwen2.5-coder-0.5b",
    # Encoder-decoder SLMs of the paper's generation experiments.
    "t5": "google-t5/t5-base",
    "bart": "facebook/bart-base",
}
# The SLM short names that are decoders (configs/pifi.py pools their last real token) and
# encoder-decoders (configs/pifi.py makes their generation runs seq2seq).
DECODER_SLMS = ("smollm2", "qwen2.5-coder-0.5b")
ENCODER_DECODER_SLMS = ("t5", "bart")
# The paper's LLMs (its main results use llama3.1), plus the offline SmolLM2-135M and, with
# requirements-assets-qwen.txt, the offline Qwen2.5-Coder 0.5B / 1.5B (GGUF).
LLMS = {
    "llama3.1": "meta-llama/Llama-3.1-8B",
    "llama3": "meta-llama/Meta-Llama-3-8B",
    "llama2": "meta-llama/Llama-2-7b-hf",
    "mistral0.1": "mistralai/Mistral-7B-v0.1",
    "mistral0.3": "mistralai/Mistral-7B-v0.3",
    "qwen2_0.5b": "Qwen/Qwen2-0.5B",
    "qwen2_1.5b": "Qwen/Qwen2-1.5B",
    "qwen2_7b": "Qwen/Qwen2-7B",
    "qwen2_72b": "Qwen/Qwen2-72B",
    "gemma2": "google/gemma-2-9b",
    "falcon": "tiiuae/falcon-7b",
    "smollm2": "asset:smollm2",
    "qwen2.5-coder-0.5b": "asset:qwen2.5-coder-0.5b",
    "qwen2.5-coder-1.5b": "asset:qwen2.5-coder-1.5b",
}


def resolve_slm(name: str) -> str:
    """The checkpoint of a short SLM name; a path or hub id is returned unchanged."""
    return SLMS.get(name, name)


def resolve_llm(name: str) -> str:
    """The checkpoint of a short LLM name; a path or hub id is returned unchanged."""
    return LLMS.get(name, name)


def short_name(path: str) -> str:
    """The short name of a checkpoint if it has one, else its last path component."""
    for table in (SLMS, LLMS):
        for short, full in table.items():
            if full == path:
                return short
    return str(path).rstrip("/").rpartition("/")[2].removeprefix("asset:")
