"""PiFi for extractive QA: the span model against a PyTorch composition, its masks, the trainer.

SLM: the tiny BERT of conftest.py; LLM: a tiny random Llama (tests/test_pifi.py). The reference is
transformers' BertModel -> W_in -> LlamaDecoderLayer (non-causal, padding masked, RoPE positions
0..S-1) -> W_out -> qa_outputs in PyTorch, with the same weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pifi_jax import pifi
from pifi_jax.train import train_and_evaluate
from tests.conftest import load_config
from tests.test_pifi import _batch, write_tiny_llm
from tests.test_qa import _write_qa_files

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_tiny_llm(tmp_path_factory.mktemp("tiny_llm") / "llama", "llama")


def _span_model(bert_dir, llm_dir, **kw):
    return pifi.build(
        bert_dir,
        llm_dir,
        -1,
        task="question_answering",
        mode="sequence",
        layer_dtype=jnp.float32,
        log=print,
        **kw,
    )


def test_span_model_matches_a_pytorch_composition(tiny_bert_dir, llama_dir):
    module, params = _span_model(tiny_bert_dir, llama_dir)
    assert isinstance(module, pifi.PifiSpanModel) and set(params) == {"bert", "pifi", "qa_outputs"}
    ids, mask = _batch()
    types = np.zeros_like(ids)
    types[:, 5:] = 1
    start, end = jax.jit(module.apply)({"params": params}, ids, mask, types)

    bert = transformers.BertModel.from_pretrained(tiny_bert_dir, add_pooling_layer=False).eval()
    llm = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    layer = llm.model.layers[-1]

    def linear(kernel, bias=None):
        out = torch.nn.Linear(*np.asarray(kernel).shape, bias=bias is not None)
        out.weight.data = torch.tensor(np.asarray(kernel).T.copy())
        if bias is not None:
            out.bias.data = torch.tensor(np.asarray(bias))
        return out

    plug = params["pifi"]
    w_in, w_out = linear(plug["w_in"]["kernel"]), linear(plug["w_out"]["kernel"])
    qa = linear(params["qa_outputs"]["kernel"], params["qa_outputs"]["bias"])
    with torch.no_grad():
        t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)
        h = bert(t_ids, attention_mask=t_mask, token_type_ids=torch.tensor(types)).last_hidden_state
        x = w_in(h)
        positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
        cos_sin = llm.model.rotary_emb(x, positions)
        # attention both ways, padded keys masked
        additive = (1.0 - t_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        additive = additive.expand(-1, 1, ids.shape[1], -1)
        y = layer(x, attention_mask=additive, position_ids=positions, position_embeddings=cos_sin)
        y = y[0] if isinstance(y, tuple) else y
        logits = qa(w_out(y))
    real = mask > 0
    for ours, theirs in ((start, logits[..., 0]), (end, logits[..., 1])):
        np.testing.assert_allclose(np.asarray(ours)[real], theirs.numpy()[real], atol=2e-5)
    assert not np.allclose(np.asarray(start)[real], np.asarray(end)[real], atol=1e-3)


def test_span_model_masks_padding_and_counts_positions_from_zero(tiny_bert_dir, llama_dir):
    module, params = _span_model(tiny_bert_dir, llama_dir)
    apply = jax.jit(lambda ids, mask: module.apply({"params": params}, ids, mask))
    ids, mask = _batch()
    start, _ = apply(ids, mask)
    real = mask > 0  # what padded positions score is never read (the objective masks them)
    other_padding = np.where(real, ids, 7)
    np.testing.assert_allclose(
        np.asarray(apply(other_padding, mask)[0])[real], np.asarray(start)[real], atol=1e-6
    )
    n = int(mask[2].sum())
    alone, _ = apply(ids[2:3, :n], mask[2:3, :n])
    np.testing.assert_allclose(np.asarray(start)[2, :n], np.asarray(alone)[0], atol=1e-5)


def test_base_span_model_has_no_plug_in(tiny_bert_dir):
    module, params = pifi.build(tiny_bert_dir, None, task="question_answering", method="base",
                                mode="sequence", log=print)  # fmt: skip
    assert module.pifi is None and set(params) == {"bert", "qa_outputs"}


def test_span_model_refuses_token_mode_auto_layer_and_prompt_tuning(
    tiny_bert_dir, llama_dir, tmp_path
):
    with pytest.raises(ValueError, match=r"set pifi.mode='sequence' \(got 'token'\)"):
        pifi.build(tiny_bert_dir, llama_dir, task="question_answering", mode="token", log=print)
    from pifi_jax.peft import PromptTuningConfig

    with pytest.raises(ValueError, match="prompt tuning's soft tokens"):
        _span_model(tiny_bert_dir, llama_dir, peft=PromptTuningConfig(num_virtual_tokens=2))
    files = _write_qa_files(tmp_path)
    config = _pifi_qa_config(tiny_bert_dir, llama_dir, files, ["--config.pifi.layer=auto"])
    with pytest.raises(ValueError, match="pifi.layer=auto: layer selection scores layers"):
        train_and_evaluate(config, tmp_path / "run")


def _pifi_qa_config(bert_dir, llm_dir, files, extra=()):
    return load_config(
        "configs/pifi.py:task=qa_local,runlocal",
        [
            f"--config.model.path={bert_dir}",
            f"--config.pifi.llm={llm_dir}",
            f"--config.data.data_files.train={files['train']}",
            f"--config.data.data_files.validation={files['validation']}",
            *extra,
        ],
    )


def test_training_steps_move_everything_but_the_frozen_layer(tiny_bert_dir, llama_dir, tmp_path):
    from pifi_jax import data
    from pifi_jax.train import TrainState, make_optimizer, make_train_step, split_params
    from pifi_jax.train.objectives import ExtractiveQA
    from pifi_jax.train.partition import flatten

    module, params = _span_model(tiny_bert_dir, llama_dir)
    trainable, frozen = split_params(params, module.trainable_rules(params))
    layer_paths = {p for p in flatten(params) if p.startswith("pifi/llm_layer/")}
    assert set(flatten(frozen)) == layer_paths
    optimizer = make_optimizer(load_config("configs/qa.py:runlocal").optim, trainable, 3)
    state = TrainState.create(trainable, frozen, optimizer)
    before = {p: np.array(v) for p, v in flatten(params).items()}

    files = _write_qa_files(tmp_path)
    examples = data.load_examples(
        data.get_task("qa_local"), "train", data_files={"train": str(files["train"])}
    )
    encoded = data.encode_spans(data.load_tokenizer(tiny_bert_dir), examples.head(16), 48, 16)
    batches = data.Batcher(encoded, 8, (48,), shuffle=True, seed=0, drop_remainder=True)
    step = jax.jit(make_train_step(ExtractiveQA(module, 48), optimizer))
    for batch in list(batches.batches(0))[:2]:
        state, metrics = step(state, batch, jax.random.PRNGKey(0))
        assert np.isfinite(float(metrics["loss"]))
    for path, value in flatten(state.frozen).items():
        assert np.array_equal(np.asarray(value), before[path]), f"frozen {path} changed"
    after = flatten(state.params)
    for path in (
        "pifi/w_in/kernel",
        "pifi/w_out/kernel",
        "qa_outputs/kernel",
        "bert/encoder/layer_0/attention/self/query/kernel",
    ):
        assert not np.array_equal(np.asarray(after[path]), before[path]), f"{path} did not train"


@pytest.mark.slow  # configs/qa.py's one-step run stays in the default set
def test_pifi_config_runs_extractive_qa_and_predicts(tiny_bert_dir, llama_dir, tmp_path):
    files = _write_qa_files(tmp_path)
    config = _pifi_qa_config(tiny_bert_dir, llama_dir, files, ["--config.train.num_steps=2"])
    assert config.pifi.mode == "sequence" and config.train.label_smoothing == 0.0
    results = train_and_evaluate(config, tmp_path / "run")
    assert results["steps"] == 2 and {"validation/exact_match", "validation/f1"} <= set(results)

    from pifi_jax.train.predict import Predictor

    rows = Predictor.from_workdir(tmp_path / "run").predict(
        (["which is good"], ["the plot was lovely"])
    )
    assert rows[0]["answer"] in "the plot was lovely"  # a span of the context (maybe empty)
