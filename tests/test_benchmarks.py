"""The benchmark suite (benchmarks/suite.py): its CPU smoke mode end to end, its child-process
plumbing, and the target logic on made-up results.

The smoke run is a harness check: tiny shapes, float32, on the CPU, every row in pifi_jax and in
PyTorch eager (torch.compile is left to `--torch-variants=eager,compile`: Inductor's CPU compile
of every row would take minutes). It writes to a temporary file, never to docs/.
"""

from __future__ import annotations

import math
import re

import pytest

from benchmarks import common, suite

pytest.importorskip("torch")
pytest.importorskip("peft")


def _main_table(markdown: str) -> list[dict]:
    """The rows of the main results table (the one with a 'framework' column) as dicts."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| row | case |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


@pytest.mark.slow  # 33 s; the suite harness, not the library
def test_smoke_run_writes_every_row_for_both_frameworks(tmp_path):
    docs = suite.DEFAULT_OUT
    before = docs.read_bytes() if docs.exists() else None
    out = tmp_path / "bench.md"

    report = suite.main(["--smoke", f"--out={out}"])

    assert report["errors"] == []
    assert (docs.read_bytes() if docs.exists() else None) == before, "the smoke wrote to docs/"
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks")
    assert "harness check, not a performance figure" in text
    # The version header.
    versions = next(line for line in text.splitlines() if line.startswith("- versions:"))
    for package in ("jax", "flax", "optax", "torch", "transformers", "peft"):
        assert re.search(rf"\b{package} \d", versions), f"{package} missing from {versions!r}"
    assert re.search(r"^- date: \d{4}-\d\d-\d\d \d\d:\d\d UTC$", text, re.M)
    assert re.search(r"^- GPU: ", text, re.M)
    assert re.search(r"matmul rate \d+(\.\d+)? TFLOP/s", text)

    rows = _main_table(text)
    assert {"target", "met", "MFU", "pifi_jax / best PyTorch", "peak memory"} <= set(rows[0])
    for row in common.ROWS:
        for framework in ("pifi_jax", "torch eager"):
            lines = [r for r in rows if r["row"] == str(row) and r["framework"] == framework]
            assert lines, f"row {row} has no {framework} line"
            for line in lines:
                step_ms = float(line["step ms"].replace(",", ""))
                assert math.isfinite(step_ms) and step_ms > 0, line
                assert float(line["tokens/s"].replace(",", "")) > 0, line
    # Every targeted pifi_jax line names its target and says whether it was met.
    targeted = [r for r in rows if r["framework"] == "pifi_jax" and r["target"] != "-"]
    assert {r["row"] for r in targeted} == {"1", "2", "3", "4", "5"}
    for line in targeted:
        assert re.match(r"(yes|no|n/a|step (yes|no)|speed (yes|no))", line["met"]), line
    # PiFi's row 4 is measured against its base, both in pifi_jax.
    assert [r["case"] for r in rows if r["row"] == "4" and r["framework"] == "pifi_jax"] == [
        "pifi",
        "base",
    ]

    # The memory analysis: the frozen weights get no optimizer state in any row.
    memory = [e["jax"] for e in report["entries"]]
    assert all(m["opt_covers_trainable_only"] for m in memory)
    assert "AdamW moments for" in text and "**frozen leaves too**" not in text
    by_method = {e["case"].method: e["jax"] for e in report["entries"]}
    for method in ("lora", "ia3", "pifi", "causal_lora"):
        assert by_method[method]["frozen_params"] > 0
        assert by_method[method]["opt_moments"] == 2 * by_method[method]["trainable_params"]
    assert by_method["full"]["frozen_params"] == 0

    # A second run appends a second section.
    suite.append_report(out, "## another\n")
    assert out.read_text(encoding="utf-8").count("\n## ") == 2


def test_isolated_measurement_runs_in_a_child_process():
    spec = {"kind": "matmul", "n": 16, "dtype": "float32", "repeats": 1}
    result = suite.measure_isolated(spec, timeout_s=120)
    assert "error" not in result, result
    assert result["backend"] == "cpu" and result["flops_per_s"] > 0

    failed = suite.measure_isolated({"kind": "nonsense"}, timeout_s=120)
    assert "unknown measurement kind" in failed["error"]


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        suite.parse_args(["--rows=1,9"])
    with pytest.raises(SystemExit):
        suite.parse_args(["--torch-variants=eager,jit"])
    full = suite.parse_args([])
    assert (full.steps, full.dtype, full.isolate, full.torch_variants) == (
        20,
        "bfloat16",
        True,
        ["eager", "compile"],
    )
    assert full.llama_batches == [8, 4, 2, 1]
    smoke = suite.parse_args(["--smoke"])
    assert (smoke.dtype, smoke.isolate, smoke.torch_variants) == ("float32", False, ["eager"])


def test_attention_flag_reaches_the_pifi_jax_step(monkeypatch):
    with pytest.raises(SystemExit):
        suite.parse_args(["--attention=flash"])
    assert suite.parse_args(["--smoke"]).attention == "native"
    import jax

    from pifi_jax.layers import ATTENTION_IMPLEMENTATIONS

    assert suite.ATTENTION_CHOICES == ATTENTION_IMPLEMENTATIONS

    calls = []
    fused = jax.nn.dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs["implementation"])
        return fused(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", counting)
    # Row 5 (a causal LM with no attention dropout): every layer takes the fused path.
    (case,) = common.cases_for_row(5, smoke=True)
    spec = {"kind": "jax", "case": case.to_json(), "steps": 1, "warmup": 1, "dtype": "float32"}
    result = suite.run_measurement({**spec, "fast_compile": True, "attention": "xla"})
    assert "error" not in result and result["step_s"] > 0, result
    assert calls and set(calls) == {"xla"}
    calls.clear()
    suite.run_measurement({**spec, "fast_compile": True})  # native by default
    assert not calls


def test_full_size_cases_have_the_issue_shapes():
    shapes = {
        row: [(c.method, c.batch, c.length) for c in common.cases_for_row(row, smoke=False)]
        for row in common.ROWS
    }
    assert shapes[1] == [("full", 32, 128), ("full", 256, 128)]
    assert shapes[2] == [("lora", 32, 128), ("lora", 256, 128)]
    assert shapes[3] == [("ia3", 32, 128), ("ia3", 256, 128)]
    assert shapes[4] == [("pifi", 32, 128), ("base", 32, 128)]
    assert shapes[5] == [("causal_lora", 8, 1024)]
    pifi = common.cases_for_row(4, smoke=False)[0]
    assert pifi.encoder == common.BERT_BASE and pifi.decoder == common.LLAMA_31_8B
    llama = common.LLAMA_31_8B
    assert (llama["hidden_size"], llama["intermediate_size"]) == (4096, 14336)
    assert (llama["num_attention_heads"], llama["num_key_value_heads"]) == (32, 8)
    # One Llama-3.1-8B layer: 218,112,000 parameters (436 MB in bf16).
    assert common.llama_layer_params(llama) == 218_112_000
    assert common.cases_for_row(2, smoke=False)[0].peft["r"] == 8
    assert common.cases_for_row(5, smoke=False)[0].peft["r"] == 16
    assert common.cases_for_row(5, smoke=False)[0].remat


def _entry(row, method, index=0, jax=None, torch=None, batch=32, length=128):
    case = common.Case(
        row, method, batch, length, encoder=common.BERT_BASE, decoder=common.LLAMA_31_8B
    )
    return {
        "case": case,
        "index": index,
        "peak_isolated": True,
        "layer_itemsize": 2,
        "jax": jax,
        "torch": torch or {},
    }


def _result(step_s, peak=None, flops=0.0, trainable=0):
    return {
        "step_s": step_s,
        "peak_bytes": peak,
        "peak_kind": "peak_bytes_in_use",
        "model_flops": flops,
        "trainable_params": trainable,
    }


def test_targets_are_judged_from_the_results():
    matmul = {"flops_per_s": 1e15}
    layer = common.llama_layer_params(common.LLAMA_31_8B) * 2
    entries = [
        # Row 1, small batch: 3x the best PyTorch variant (compile), whatever eager did.
        _entry(1, "full", 0, _result(1.0), {"eager": _result(5.0), "compile": _result(3.0)}),
        # Row 1, large batch: MFU 40%.
        _entry(1, "full", 1, _result(1.0, flops=4e14), {"eager": {"error": "boom"}}),
        # Row 4: 2% slower than base; extra memory just under 1.1x the layer.
        _entry(4, "pifi", 0, _result(1.02, 10 * 2**30 + int(1.09 * layer), trainable=2**20 + 5)),
        _entry(4, "base", 0, _result(1.0, 10 * 2**30, trainable=5)),
        # Row 5: 1.6x faster, but more memory than that PyTorch variant.
        _entry(
            5,
            "causal_lora",
            0,
            _result(1.0, peak=30 * 2**30),
            {"eager": _result(1.6, peak=20 * 2**30), "compile": _result(2.0, peak=10)},
        ),
        # Row 2 without any PyTorch result.
        _entry(2, "lora", 0, _result(1.0), {"eager": {"error": "CUDA out of memory"}}),
    ]
    suite.evaluate_targets(entries, matmul)
    met = [e["met"] for e in entries]
    assert met[0] == "yes (3.00×)"
    assert met[1] == "no (40.0%)"
    assert met[2].startswith("step yes (1.020×); memory yes")
    assert "W_in/W_out with grads and AdamW 16.00 MiB" in met[2]
    assert met[3] == "-"
    assert met[4].startswith("speed yes (1.60× vs torch eager); memory no")
    assert met[5] == "n/a"
    assert suite._is_oom(entries[5]["torch"]["eager"])
    table = suite.main_table(entries, matmul)
    assert "failed: boom" in table and "3.00× (vs torch compile)" in table


@pytest.mark.slow
def test_full_size_steps_lower_on_abstract_values():
    """Every full-size pifi_jax step traces and lowers (shapes, dtypes, partition, optimizer)
    without allocating anything: the GPU run's configuration is checked on the CPU."""
    report = suite.main(["--dry-run"])
    assert report["errors"] == []
    table = report["markdown"]
    assert "| 2 | lora 32x128 | 296,450 | 109,482,240 |" in table  # LoRA r8 on query, value
    assert "| 4 | pifi 32x128 | 115,775,234 | 218,112,000 |" in table  # one 8B layer, frozen
    assert "| 5 | causal_lora 8x1024 | 41,943,040 | 8,030,261,248 |" in table  # Llama-3.1-8B


def test_row_5_steps_the_batch_down_until_both_frameworks_fit(tmp_path, monkeypatch):
    fake = {
        "step_s": 0.01,
        "peak_bytes": None,
        "peak_kind": None,
        "compile_s": 1.0,
        "model_flops": 1e9,
        "memory_analysis": dict.fromkeys(("argument", "output", "alias", "temp"), 0),
        "trainable_params": 1,
        "frozen_params": 2,
        "trainable_bytes": 4,
        "opt_state_bytes": 8,
        "frozen_bytes": 4,
        "opt_covers_trainable_only": True,
    }
    matmul = {"flops_per_s": 1e12, "n": 8, "dtype": "float32", "chain": 1, "repeats": 1}
    matmul.update(backend="cpu", device_kind="cpu", device_count=1)
    batches = []

    def run_measurement(spec):
        if spec["kind"] == "matmul":
            return matmul
        batches.append((spec["kind"], spec["case"]["batch"]))
        if spec["kind"] == "torch" and spec["case"]["batch"] > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return fake

    monkeypatch.setattr(suite, "run_measurement", run_measurement)
    out = tmp_path / "bench.md"
    report = suite.main(["--smoke", "--rows=5", "--llama-batches=8,4,2,1", f"--out={out}"])
    assert batches == [("jax", 8), ("torch", 8), ("jax", 4), ("torch", 4), ("jax", 2), ("torch", 2)]
    (entry,) = report["entries"]
    assert entry["case"].batch == 2 and entry["out_of_memory_at"] == [8, 4]
    assert report["errors"] == []
    assert "2 × 16 (batch 8, 4: out of memory)" in out.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# benchmarks/cpu_speed.py (issue 16): pifi_jax vs PyTorch on the CPU, interleaved in one process


def test_cpu_speed_ratio_is_against_the_best_torch_variant():
    from benchmarks import cpu_speed

    case = common.Case(0, "lora", 32, 64, common.BERT_SMOKE)
    result = {
        "pifi_jax": {"first_s": 9.0, "times": [0.5, 0.4, 0.6]},
        "torch eager": {"first_s": 1.0, "times": [0.7, 0.8, 0.9]},
        "torch compile": {"first_s": 30.0, "times": [0.45, 0.5, 0.55]},
    }
    rows = {r[1]: r for r in cpu_speed.row_table(case, result)}
    assert rows["pifi_jax"][5] == "1.00x" and rows["pifi_jax"][6] == "no"  # 0.5 / 0.5
    assert rows["pifi_jax"][3] == f"{32 * 64 / 0.5:,.0f}"
    result["torch compile"]["times"] = [0.9, 1.0]
    rows = {r[1]: r for r in cpu_speed.row_table(case, result)}
    assert rows["pifi_jax"][5] == "1.60x" and rows["pifi_jax"][6] == "yes"  # 0.8 / 0.5
    assert rows["torch eager"][5] == ""
    with pytest.raises(SystemExit):
        cpu_speed.parse_args(["--methods=full,dora"])


@pytest.mark.slow  # 12 s; the harness, not the library
def test_cpu_speed_smoke_runs_every_method_in_both_frameworks(capsys):
    from benchmarks import cpu_speed

    args = ["--smoke", "--rounds=1", "--torch-variants=eager"]
    report = cpu_speed.main(args)
    rows = [line.split("|")[2:4] for line in report.splitlines() if line.startswith("| ")]
    cells = {(case.strip().split()[0], fw.strip()) for case, fw in rows[1:]}
    for method in cpu_speed.METHODS:
        for framework in ("pifi_jax", "torch eager"):
            assert (method, framework) in cells, (method, framework)
    assert "harness check" in report


def test_cost_growth_table_and_sweeps():
    from benchmarks import cost_growth

    args = cost_growth.argparse.Namespace(batch=8, lengths=[32, 64], length=128, batches=[1, 4])
    assert cost_growth.points(args) == [
        ("length", 8, 32), ("length", 8, 64), ("batch", 1, 128), ("batch", 4, 128),
    ]  # fmt: skip
    rows = [{"sweep": "length", "batch": 8, "length": 32, "pifi_jax": 0.25, "torch eager": 0.5,
             "jax_step_bytes": 3 * 2**20}]  # fmt: skip
    cells = cost_growth.table(rows).splitlines()[2].split("|")[1:-1]
    assert [c.strip() for c in cells] == [
        "length", "8 x 32", "250", "500", "1,024", "512", "2.00x", "3.00 MiB",
    ]  # fmt: skip


@pytest.mark.slow  # 10 s; the harness
def test_cost_growth_smoke_draws_the_figure(tmp_path):
    from benchmarks import cost_growth

    rows = cost_growth.main(["--smoke", "--rounds=1", f"--plot={tmp_path / 'g.png'}"])
    assert [r["sweep"] for r in rows] == ["length", "length", "batch", "batch"]
    assert all(r["pifi_jax"] > 0 and r["torch eager"] > 0 and r["jax_step_bytes"] for r in rows)
    assert (tmp_path / "g.png").stat().st_size > 10_000


def test_generation_speed_rows_and_report():
    """--rows picks rows by name (bad ones refused by name); the report's ratio is pifi_jax's
    tokens/s over transformers' and agreement is shown for greedy rows only."""
    import argparse

    from benchmarks import generation_speed as gs

    assert gs.rows_of("") == gs.ROWS
    assert gs.rows_of("beam:8,greedy:1") == (("beam", 8), ("greedy", 1))
    with pytest.raises(ValueError, match="'sample:2'"):
        gs.rows_of("sample:2")
    args = argparse.Namespace(rounds=1, new_tokens=16)
    results = {
        ("greedy", 8): {"pifi_jax": 2.0, "transformers": 5.0, "compile_s": 3.0, "agree": 0.75},
        ("beam", 1): {"pifi_jax": 4.0, "transformers": 2.0, "compile_s": 3.0, "agree": None},
    }
    table = [line for line in gs.report(results, args).splitlines() if line.startswith("| ")]
    greedy, beam = table[-2], table[-1]
    assert "| 64.0 | 25.6 | 2.50x |" in greedy and "75.0%" in greedy  # 8 x 16 tokens
    assert "| 4.0 | 8.0 | 0.50x |" in beam and beam.endswith("| - |")
