"""Freezing rules: first match wins, every leaf is covered, split/merge round trip, the table."""

import re

import jax
import numpy as np
import pytest

from pifi_jax.partition import (
    flatten,
    label_leaves,
    merge_params,
    partition_table,
    split_params,
    unflatten,
)


def _bert_like(num_layers=6, hidden=8):
    def dense(n_in, n_out):
        return {"kernel": np.ones((n_in, n_out), np.float32), "bias": np.zeros(n_out, np.float32)}

    def norm():
        return {"scale": np.ones(hidden, np.float32), "bias": np.zeros(hidden, np.float32)}

    def layer():
        return {
            "attention": {
                "self": {name: dense(hidden, hidden) for name in ("query", "key", "value")},
                "output": {"dense": dense(hidden, hidden), "LayerNorm": norm()},
            },
            "intermediate": {"dense": dense(hidden, 4 * hidden)},
            "output": {"dense": dense(4 * hidden, hidden), "LayerNorm": norm()},
        }

    return {
        "bert": {
            "embeddings": {
                "word_embeddings": {"embedding": np.ones((50, hidden), np.float32)},
                "LayerNorm": norm(),
            },
            "encoder": {f"layer_{i}": layer() for i in range(num_layers)},
            "pooler": {"dense": dense(hidden, hidden)},
        },
        "classifier": dense(hidden, 3),
    }


def test_flatten_unflatten_paths():
    params = _bert_like(num_layers=1)
    flat = flatten(params)
    assert "bert/encoder/layer_0/attention/self/query/kernel" in flat
    assert flatten(unflatten(flat)).keys() == flat.keys()


def test_first_matching_rule_wins():
    params = _bert_like(num_layers=2)
    labels = label_leaves(
        params,
        [
            (r"bert/encoder/layer_1/.*", "frozen"),
            (r".*/bias", "trainable"),
            (r".*", "frozen"),
        ],
    )
    assert labels["bert/encoder/layer_1/attention/self/query/bias"] == "frozen"
    assert labels["bert/encoder/layer_0/attention/self/query/bias"] == "trainable"
    assert labels["bert/encoder/layer_0/attention/self/query/kernel"] == "frozen"


def test_rules_use_fullmatch():
    labels = label_leaves({"a": {"bias": np.zeros(1)}}, [("bias", "trainable"), (".*", "frozen")])
    assert labels["a/bias"] == "frozen"


def test_unmatched_leaf_is_refused_by_name():
    params = _bert_like(num_layers=1)
    with pytest.raises(ValueError, match=re.escape("classifier/kernel")) as err:
        label_leaves(params, [(r"bert/.*", "frozen"), (r"classifier/bias", "trainable")])
    assert "1 parameter(s)" in str(err.value)


def test_many_unmatched_leaves_are_counted():
    params = _bert_like(num_layers=3)
    with pytest.raises(ValueError, match=r"and \d+ more"):
        label_leaves(params, [(r"classifier/.*", "trainable")])


def test_bad_label_and_bad_regex_are_refused():
    params = _bert_like(num_layers=1)
    with pytest.raises(ValueError, match="'train'"):
        label_leaves(params, [(".*", "train")])
    with pytest.raises(ValueError, match=re.escape("'layer_(0'")):
        label_leaves(params, [("layer_(0", "frozen"), (".*", "trainable")])


def test_split_and_merge_round_trip():
    params = _bert_like(num_layers=2)
    rules = [(r".*/(bias|scale)", "trainable"), (r"classifier/.*", "trainable"), (".*", "frozen")]
    trainable, frozen = split_params(params, rules)
    assert all(
        p.endswith(("bias", "scale")) or p.startswith("classifier") for p in flatten(trainable)
    )
    assert not any(p.endswith(("bias", "scale")) for p in flatten(frozen))
    merged = merge_params(trainable, frozen)
    flat_merged, flat_params = flatten(merged), flatten(params)
    assert flat_merged.keys() == flat_params.keys()
    assert all(flat_merged[k] is flat_params[k] for k in flat_params)


def test_split_may_leave_a_part_empty():
    params = _bert_like(num_layers=1)
    trainable, frozen = split_params(params, [(".*", "frozen")])
    assert trainable == {}
    assert flatten(merge_params(trainable, frozen)).keys() == flatten(params).keys()


def test_merge_refuses_overlap():
    with pytest.raises(ValueError, match="a/b"):
        merge_params({"a": {"b": 1}}, {"a": {"b": 2, "c": 3}})


def test_table_counts_add_up():
    params = _bert_like(num_layers=6)
    rules = [
        (r"bert/encoder/layer_3/.*", "trainable"),
        (r"classifier/.*", "trainable"),
        (r".*", "frozen"),
    ]
    table = partition_table(params, rules)
    lines = table.splitlines()
    assert len(lines) < 25

    sizes = {path: leaf.size for path, leaf in flatten(params).items()}
    trainable_total = sum(
        s for p, s in sizes.items() if p.startswith(("bert/encoder/layer_3/", "classifier/"))
    )
    total = sum(sizes.values())

    def numbers(line):
        return [int(x.replace(",", "")) for x in line.split()[1:]]

    module_rows = lines[lines.index("") + 2 : -2]
    names = [row.split()[0] for row in module_rows]
    assert names == [
        "bert/embeddings",
        "bert/encoder/layer_{0-2}",
        "bert/encoder/layer_3",
        "bert/encoder/layer_{4-5}",
        "bert/pooler",
        "classifier",
    ]
    assert sum(numbers(r)[0] for r in module_rows) == trainable_total
    assert sum(numbers(r)[1] for r in module_rows) == total - trainable_total
    assert numbers(lines[-2]) == [trainable_total, total - trainable_total]
    label_rows = {line.split()[0]: numbers(line) for line in lines[1:3]}
    assert label_rows["trainable"][1] + label_rows["frozen"][1] == total
    assert label_rows["trainable"][0] + label_rows["frozen"][0] == len(sizes)
    assert f"{100 * trainable_total / total:.2f}%" in lines[-1]


def test_table_accepts_abstract_params():
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _bert_like(2))
    assert "total" in partition_table(params, [(".*", "trainable")])
