"""Freezing as a partition of the parameter tree by path rules.

A rule is a ``(regex, label)`` pair; the regex is matched with ``re.fullmatch`` against the
"/"-joined path of a leaf (``bert/encoder/layer_0/attention/self/query/kernel``) and the first
matching rule decides the label, ``"trainable"`` or ``"frozen"``. Every leaf must match some rule:
a catch-all is written explicitly (``(".*", "frozen")``) so that a typo in a rule cannot silently
freeze or unfreeze half a model.

The trainer splits the tree once, differentiates only with respect to the trainable part and gives
only that part to the optimizer, so frozen leaves cost no gradient buffer and no optimizer state.
(``optax.masked`` alone would not freeze: it passes masked-out updates through unchanged.)

Example::

    rules = [(r".*/lora_[ab]", "trainable"), (r"classifier/.*", "trainable"), (r".*", "frozen")]
    print(partition_table(params, rules))
    trainable, frozen = split_params(params, rules)
    ...
    params = merge_params(trainable, frozen)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from flax import traverse_util

LABELS = ("trainable", "frozen")
_SHOWN_UNMATCHED = 5
# A path component carrying a layer index: "layer_3", "layers_10", "h_0", "block3", "0".
_INDEXED = re.compile(r"(.*?)(\d+)")


def flatten(tree) -> dict[str, Any]:
    """Nested dict -> ``{"a/b/c": leaf}``."""
    return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: dict[str, Any]) -> dict:
    """``{"a/b/c": leaf}`` -> nested dict; the inverse of :func:`flatten`."""
    return traverse_util.unflatten_dict(flat, sep="/")


def _compile_rules(rules: Sequence[tuple[str, str]]) -> list[tuple[re.Pattern, str]]:
    compiled = []
    for pattern, label in rules:
        if label not in LABELS:
            raise ValueError(
                f"Rule {pattern!r} has label {label!r}; a label must be one of {LABELS}."
            )
        try:
            compiled.append((re.compile(pattern), label))
        except re.error as err:
            raise ValueError(f"Rule regex {pattern!r} is invalid: {err}") from err
    return compiled


def label_leaves(params, rules: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Map each leaf path to its label; the first rule whose regex fully matches the path wins."""
    compiled = _compile_rules(rules)
    labels, unmatched = {}, []
    for path in flatten(params):
        label = next((lab for regex, lab in compiled if regex.fullmatch(path)), None)
        if label is None:
            unmatched.append(path)
        else:
            labels[path] = label
    if unmatched:
        shown = ", ".join(unmatched[:_SHOWN_UNMATCHED])
        more = (
            f" (and {len(unmatched) - _SHOWN_UNMATCHED} more)"
            if len(unmatched) > _SHOWN_UNMATCHED
            else ""
        )
        raise ValueError(
            f"{len(unmatched)} parameter(s) match no partition rule: {shown}{more}. "
            'Add a rule for them, e.g. a final catch-all (".*", "frozen").'
        )
    return labels


def split_params(params, rules: Sequence[tuple[str, str]]) -> tuple[dict, dict]:
    """Split into ``(trainable, frozen)`` nested dicts; either may be empty."""
    labels = label_leaves(params, rules)
    flat = flatten(params)
    parts = {label: {} for label in LABELS}
    for path, leaf in flat.items():
        parts[labels[path]][path] = leaf
    return unflatten(parts["trainable"]), unflatten(parts["frozen"])


def merge_params(trainable, frozen) -> dict:
    """Inverse of :func:`split_params`; a path present in both parts is an error."""
    flat_trainable, flat_frozen = flatten(trainable), flatten(frozen)
    overlap = sorted(flat_trainable.keys() & flat_frozen.keys())
    if overlap:
        raise ValueError(
            f"{len(overlap)} path(s) are both trainable and frozen: {', '.join(overlap[:5])}"
        )
    return unflatten({**flat_trainable, **flat_frozen})


def _size(leaf) -> int:
    # Works for concrete arrays and for jax.ShapeDtypeStruct (abstract params).
    return math.prod(leaf.shape)


def _group_of(path: str) -> tuple[str, str, int | None]:
    """``(group, base, index)`` of a leaf's module row.

    The group is the path up to and including its first indexed component (the layer), or else its
    first two components (never the leaf name itself). ``base`` has the index replaced by ``{}`` so
    that runs of identical layers can be merged into one row.
    """
    parts = path.split("/")[:-1] or path.split("/")
    for depth, part in enumerate(parts):
        match = _INDEXED.fullmatch(part)
        if match:
            prefix = "/".join(parts[:depth] + [match.group(1) + "{}"])
            return "/".join(parts[: depth + 1]), prefix, int(match.group(2))
    group = "/".join(parts[:2])
    return group, group, None


def partition_table(params, rules: Sequence[tuple[str, str]]) -> str:
    """A short printable summary of the partition: per label, then per module row, then totals.

    Consecutive layers with the same trainable/frozen counts are merged into one row
    (``bert/encoder/layer_{0-5}``); a row's counts are summed over the layers it covers, so the
    module rows add up to the totals.
    """
    labels = label_leaves(params, rules)
    flat = flatten(params)

    leaves = dict.fromkeys(LABELS, 0)
    sizes = dict.fromkeys(LABELS, 0)
    # base -> index -> [trainable, frozen]; dict order keeps first appearance in the tree.
    modules: dict[str, dict[int | None, list[int]]] = {}
    for path, leaf in flat.items():
        label, size = labels[path], _size(leaf)
        leaves[label] += 1
        sizes[label] += size
        _, base, index = _group_of(path)
        counts = modules.setdefault(base, {}).setdefault(index, [0, 0])
        counts[LABELS.index(label)] += size

    rows: list[tuple[str, int, int]] = []
    for base, by_index in modules.items():
        if None in by_index:
            rows.append((base, *by_index[None]))
            continue
        run: list[int] = []
        for index in sorted(by_index):
            if run and (index != run[-1] + 1 or by_index[index] != by_index[run[0]]):
                rows.append(_run_row(base, run, by_index))
                run = []
            run.append(index)
        rows.append(_run_row(base, run, by_index))

    total = sizes["trainable"] + sizes["frozen"]
    percent = 100.0 * sizes["trainable"] / total if total else 0.0
    name_width = max([len("module"), len("total")] + [len(name) for name, _, _ in rows])
    lines = [
        f"{'label':<{name_width}}  {'leaves':>8}  {'parameters':>14}",
        *(f"{lab:<{name_width}}  {leaves[lab]:>8,}  {sizes[lab]:>14,}" for lab in LABELS),
        "",
        f"{'module':<{name_width}}  {'trainable':>14}  {'frozen':>14}",
        *(f"{name:<{name_width}}  {t:>14,}  {f:>14,}" for name, t, f in rows),
        f"{'total':<{name_width}}  {sizes['trainable']:>14,}  {sizes['frozen']:>14,}",
        f"trainable: {sizes['trainable']:,} of {total:,} parameters ({percent:.2f}%)",
    ]
    return "\n".join(lines)


def _run_row(base: str, run: list[int], by_index: dict) -> tuple[str, int, int]:
    span = str(run[0]) if len(run) == 1 else f"{{{run[0]}-{run[-1]}}}"
    trainable = sum(by_index[i][0] for i in run)
    frozen = sum(by_index[i][1] for i in run)
    return base.replace("{}", span), trainable, frozen
