"""benchmarks/peft_steps.py: the side-by-side PEFT step-time benchmark runs on the real offline
default and reports each method's row (two methods, one timed round: a harness check)."""

import pytest

from benchmarks import peft_steps


@pytest.mark.slow  # 23 s; a benchmark harness
def test_methods_take_turns_and_are_reported_against_full_fine_tuning(capsys):
    report = peft_steps.main(["--methods=bitfit,full", "--rounds=1", "--length=32"])
    assert capsys.readouterr().out.strip() == report.strip()
    rows = {
        cells[0]: cells
        for cells in (
            [c.strip() for c in line.strip("|").split("|")]
            for line in report.splitlines()
            if line.startswith("| bitfit") or line.startswith("| full")
        )
    }
    assert set(rows) == {"bitfit", "full"}
    trainable = {name: int(cells[1].replace(",", "")) for name, cells in rows.items()}
    assert trainable["bitfit"] < trainable["full"] / 100
    assert rows["full"][4] == "1.00"
    assert float(rows["bitfit"][2]) > 0 and float(rows["full"][2]) > 0


def test_unknown_method_is_refused_naming_it(capsys):
    import pytest

    with pytest.raises(SystemExit):
        peft_steps.main(["--methods=lora,qlora"])
    assert "qlora" in capsys.readouterr().err
