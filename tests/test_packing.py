"""Causal-LM packing: several examples per row, each as if it were alone.

Model level: a packed row (segment ids 1, 2, ... in the attention mask) gives every segment the
logits it gets alone, for every decoder family (sliding windows and soft-capping included) and
under prefix and prompt tuning; the same row with a plain 0/1 mask does not, so the checks can
fail. Positions restart per segment (checked against a loop written here). Data level: the
Batcher puts every example in exactly one row, the same rows every epoch, targets-only loss
masks that never cross a boundary. Objective level: the packed loss and gradient equal the
unpacked ones. And a whole run trains with data.pack=True.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import pifi_jax
from pifi_jax import data, peft
from pifi_jax.layers import positions_from_mask
from pifi_jax.train import CausalLM, train_and_evaluate
from pifi_jax.train.partition import split_params
from tests.conftest import load_config

torch = pytest.importorskip("torch")

from tests.test_models_decoders import CASES, tiny_decoder  # noqa: E402
from tests.test_peft_decoders import _perturbed  # noqa: E402

ATOL = 1e-5  # float32 logits of size ~1; measured below 1e-6


def _quiet(*_):
    pass


def _packed_row(lengths, row_length, seed=0):
    """Random segments of `lengths` back to back in one row: (segments, ids [1, L], mask [1, L])."""
    rng = np.random.default_rng(seed)
    segments = [rng.integers(1, 99, size=n).astype(np.int32) for n in lengths]
    ids = np.zeros((1, row_length), np.int32)
    mask = np.zeros((1, row_length), np.int32)
    end = 0
    for number, segment in enumerate(segments, start=1):
        begin, end = end, end + len(segment)
        ids[0, begin:end], mask[0, begin:end] = segment, number
    return segments, ids, mask


def _logits(module, params, ids, mask):
    out = np.asarray(module.apply({"params": params}, ids, mask))
    return out[:, -ids.shape[1] :]  # prompt tuning: the soft prompt's slots dropped


# In the default run: one case per mask rule (causal: llama; windows + soft-capping: gemma2) and
# per virtual-token method (gpt2's learnt positions under prompt tuning); every family with -m slow.
_DEFAULT = {"llama", "gemma2", "prefix-llama", "prompt-gpt2"}


def _cases():
    # Dynamic NTK scaling grows theta from a call's largest position, padding slots included,
    # so a segment alone and in a longer row differ by design (layers/rotary.py).
    cases = [(case, None, case) for case in CASES if case != "llama_tied_dynamic"]
    for case in ("llama", "gpt2"):
        cases.append((case, peft.PrefixTuningConfig(num_virtual_tokens=3), f"prefix-{case}"))
        cases.append((case, peft.PromptTuningConfig(num_virtual_tokens=3), f"prompt-{case}"))
    for case, method, name in cases:
        marks = [] if name in _DEFAULT else [pytest.mark.slow]
        yield pytest.param(case, method, id=name, marks=marks)


@pytest.mark.parametrize("case, method", list(_cases()))
def test_each_packed_segment_gets_its_logits_alone(tmp_path, case, method):
    tiny_decoder(case).save_pretrained(tmp_path)
    module, params = pifi_jax.from_pretrained(tmp_path, task="causal_lm", peft=method, log=_quiet)
    if method is not None:
        params = _perturbed(params)  # a trained-looking prefix / prompt
    # Segments longer than the sliding windows (3, 4) and a padded tail.
    segments, ids, mask = _packed_row([6, 8, 5], 22)
    packed = _logits(module, params, ids, mask)
    unseparated = _logits(module, params, ids, (mask > 0).astype(np.int32))
    end = 0
    for segment in segments:
        begin, end = end, end + len(segment)
        alone = _logits(module, params, segment[None], np.ones((1, len(segment)), np.int32))
        np.testing.assert_allclose(packed[0, begin:end], alone[0], atol=ATOL)
        if begin:  # the first segment has nothing before it either way
            assert np.abs(unseparated[0, begin:end] - alone[0]).max() > 1e-3


def _positions_by_loop(mask: np.ndarray) -> np.ndarray:
    out = np.zeros_like(mask)
    for b, row in enumerate(mask):
        count, previous = 0, 0
        for slot, segment in enumerate(row):
            if segment == 0:
                out[b, slot] = slot  # padding keeps its slot index
            else:
                count = count + 1 if segment == previous else 1
                out[b, slot] = count - 1
            previous = segment
    return out


def test_positions_restart_at_each_segment():
    mask = np.array(
        [
            [1, 1, 1, 1, 0, 0, 0, 0],  # right padding
            [0, 0, 0, 1, 1, 1, 1, 1],  # left padding
            [1, 1, 2, 2, 2, 3, 0, 0],  # packed
            [1, 1, 0, 2, 2, 2, 0, 3],  # packed with gaps
            [-1, -1, 1, 1, 2, 2, 2, 0],  # shared front slots (a soft prompt), then segments
        ],
        np.int32,
    )
    expected = _positions_by_loop(mask)
    assert expected[2].tolist() == [0, 1, 0, 1, 2, 0, 6, 7]
    np.testing.assert_array_equal(np.asarray(positions_from_mask(mask)), expected)


def _encoded(lengths, prompt_lengths, pad_id=0):
    rng = np.random.default_rng(1)
    ids = [rng.integers(4, 50, size=n).astype(np.int32) for n in lengths]
    return data.Encoded(
        ids, None, None, pad_id, layout="causal_lm", prompt_lengths=np.asarray(prompt_lengths)
    )


def test_batcher_packs_every_example_once_with_boundary_safe_loss_masks():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 15, size=60)
    prompts = np.minimum(rng.integers(0, 6, size=60), lengths - 1)
    prompts[:3] = 0  # no prompt: the first token would be a target
    enc = _encoded(lengths, prompts)
    make = lambda: data.Batcher(  # noqa: E731
        enc, 4, (16, 32), shuffle=True, seed=3, drop_remainder=False, pack=True
    )
    batcher = make()
    assert batcher.num_batches() * 4 >= len(batcher.rows)
    assert all(batcher.lengths <= 32)
    placed = np.concatenate(batcher.rows)
    assert sorted(placed.tolist()) == list(range(60))  # every example in exactly one row
    assert len(batcher.rows) < 60 / 2  # packed: several examples per row
    seen = []
    for epoch in (0, 1):
        for batch in make().batches(epoch):
            assert (batch["index"] == -1).all()
            for ids, mask, loss_mask in zip(
                batch["input_ids"], batch["attention_mask"], batch["loss_mask"], strict=True
            ):
                # Recover the segments from the mask and match each to its example.
                for segment in range(1, mask.max() + 1):
                    where = np.flatnonzero(mask == segment)
                    assert (np.diff(where) == 1).all()
                    match = [
                        i
                        for i in range(60)
                        if len(enc.input_ids[i]) == len(where)
                        and (enc.input_ids[i] == ids[where]).all()
                    ]
                    assert len(match) >= 1
                    i = match[0]
                    seen.append((epoch, i))
                    expected = np.zeros(len(where), np.int32)
                    expected[max(prompts[i], 1) :] = 1  # targets, never the segment's first
                    np.testing.assert_array_equal(loss_mask[where], expected)
                assert (loss_mask[mask == 0] == 0).all()
    for epoch in (0, 1):
        assert sorted(i for e, i in seen if e == epoch) == list(range(60))
    # The same rows every epoch and for every instance with the seed; another seed differs.
    assert [r.tolist() for r in make().rows] == [r.tolist() for r in batcher.rows]
    other = data.Batcher(enc, 4, (16, 32), shuffle=True, seed=4, drop_remainder=False, pack=True)
    assert [r.tolist() for r in other.rows] != [r.tolist() for r in batcher.rows]


def test_packing_is_refused_where_it_does_not_apply():
    enc = _encoded([5, 6], [2, 2])
    with pytest.raises(ValueError, match=r"data\.pack.*generation"):
        data.Batcher(enc, 2, (8,), shuffle=False, seed=0, drop_remainder=False, generate=True,
                     pack=True)  # fmt: skip
    classification = data.Encoded([np.arange(4, dtype=np.int32)], [np.zeros(4, np.int32)],
                                  np.zeros(1, np.int64), 0)  # fmt: skip
    with pytest.raises(ValueError, match=r"data\.pack.*classification"):
        data.Batcher(classification, 1, (8,), shuffle=False, seed=0, drop_remainder=False,
                     pack=True)  # fmt: skip


def test_packed_loss_and_gradient_equal_the_unpacked_ones(tiny_llama_dir):
    module, params = pifi_jax.from_pretrained(tiny_llama_dir, task="causal_lm", log=_quiet)
    tok = data.load_tokenizer(str(tiny_llama_dir))
    words = "the movie was good a plot dull and weak film great bad".split()
    rng = np.random.default_rng(0)
    prompts = [" ".join(rng.choice(words, size=rng.integers(1, 5))) for _ in range(10)]
    targets = [" ".join(rng.choice(words, size=rng.integers(1, 4))) for _ in range(10)]
    examples = data.Examples((prompts,), None, "test", targets=targets)
    enc = data.encode_generation(
        tok, examples, layout="causal_lm", prompt="{source}", max_length=8, max_target_length=6
    )
    kw = dict(shuffle=False, seed=0, drop_remainder=False)
    unpacked = next(data.Batcher(enc, 10, (16,), **kw).batches(0))
    packer = data.Batcher(enc, 10, (32,), pack=True, **kw)
    packed = next(packer.batches(0))
    assert packed["weights"].sum() == len(packer.rows) < 10
    objective = CausalLM(module, tok)
    trainable, frozen = split_params(params, [(r".*", "trainable")])
    grad = jax.value_and_grad(objective.loss_fn, has_aux=True)
    (loss_u, aux_u), grad_u = grad(trainable, frozen, unpacked, jax.random.key(0))
    (loss_p, aux_p), grad_p = grad(trainable, frozen, packed, jax.random.key(0))
    assert float(aux_p["weight"]) == float(aux_u["weight"]) == unpacked["loss_mask"][:, 1:].sum()
    np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grad_p), jax.tree.leaves(grad_u), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_a_packed_run_trains_and_logs_its_fill(tmp_path, tiny_llama_dir, tiny_pair_files, capsys):
    overrides = [f"--config.model.path={tiny_llama_dir}", "--config.task=pairs"]
    overrides += [f"--config.data.data_files.{s}={p}" for s, p in tiny_pair_files.items()]
    overrides += ["--config.data.pack=True", "--config.train.num_steps=3"]
    overrides += ["--config.train.log_every_steps=1"]
    config = load_config("configs/causal_lm.py:runlocal", overrides)
    results = train_and_evaluate(config, tmp_path / "run")
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("packing: ") and "filled" in line for line in lines)
    records = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [x["train/loss"] for x in records if "train/loss" in x]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert 0.0 <= results["test/rougeL"] <= 100.0
