"""benchmarks/generation_study.py: the full-FT / LoRA / IA3 generation study runs end to end on a
tiny decoder and tiny text pairs (a harness check), and its two frameworks train the same weights."""

import pytest

from benchmarks import generation_study


def _rows(report: str, names) -> dict:
    return {
        cells[0]: cells
        for cells in (
            [c.strip() for c in line.strip("|").split("|")]
            for line in report.splitlines()
            if line.startswith("| ")
        )
        if cells[0] in names
    }


@pytest.mark.slow  # a minute of the default suite's budget: run with -m slow
def test_study_reports_every_method_for_both_parts(tmp_path, tiny_llama_dir, tiny_pair_files):
    extra = ["--set=task=pairs", "--set=data.source=local"]
    extra += [f"--set=data.data_files.{s}={p}" for s, p in tiny_pair_files.items()]
    extra += [
        "--set=data.max_length=24",
        "--set=data.max_target_length=8",
        "--set=data.buckets=(16, 32)",
        "--set=generation.max_new_tokens=4",
    ]
    report = generation_study.main(
        [
            f"--model={tiny_llama_dir}",
            "--rounds=1",
            "--length=16",
            f"--workdir={tmp_path}",
            *extra,
        ]
    )
    quality = report.split("### Train steps")[0]
    rows = _rows(quality, generation_study.METHODS)
    assert set(rows) == set(generation_study.METHODS)
    assert rows["zero_shot"][1] == "0"
    trainable = {n: int(rows[n][1].replace(",", "")) for n in generation_study.TRAINED}
    assert trainable["ia3"] < trainable["lora"] < trainable["full"]
    for cells in rows.values():
        assert all(0.0 <= float(v) <= 100.0 + 1e-9 for v in cells[2:7])
    speed = _rows(report.split("### Train steps")[1], generation_study.TRAINED)
    assert set(speed) == set(generation_study.TRAINED)
    for cells in speed.values():
        ours, theirs = (float(x) for x in cells[8].split(" / "))
        assert abs(ours - theirs) < 1e-4 * max(1.0, abs(theirs))  # the same weights and batch
    assert speed["full"][5] == "1.00" and speed["full"][7] == "1.00"


@pytest.mark.slow  # 19 s; a benchmark script
def test_packing_benchmark_reports_both_arms(tmp_path, tiny_llama_dir, tiny_pair_files):
    from benchmarks import packing

    extra = ["--set=task=pairs", "--set=data.source=local"]
    extra += [f"--set=data.data_files.{s}={p}" for s, p in tiny_pair_files.items()]
    extra += ["--set=data.max_length=24", "--set=data.max_target_length=8"]
    extra += ["--set=data.buckets=(16, 32)", "--set=generation.max_new_tokens=4"]
    report = packing.main([f"--model={tiny_llama_dir}", f"--workdir={tmp_path}", *extra])
    scores, epoch = report.split("### One LoRA epoch")
    assert set(_rows(scores, packing.ARMS)) == set(packing.ARMS)
    rows = _rows(epoch, packing.ARMS)
    steps = {arm: int(rows[arm][1]) for arm in packing.ARMS}
    slots = {arm: int(rows[arm][2].replace(",", "")) for arm in packing.ARMS}
    fill = {arm: float(rows[arm][3].rstrip("%")) for arm in packing.ARMS}
    # Fewer slots and steps, a larger share of them real (each run drops its last partial batch,
    # so the target counts differ).
    assert steps["packed"] < steps["unpacked"] and slots["packed"] < slots["unpacked"]
    assert fill["packed"] > fill["unpacked"]
    assert rows["unpacked"][6] == "1.00"
