r"""Predict with a trained run: class names and probabilities (or scores, or generated text).

    python -m launch.predict --workdir=RUN --input=FILE [--output=FILE] [--batch_size=N]
    cat texts.txt | python -m launch.predict --workdir=RUN      # one text per line (pairs: TAB)

FILE is a .csv/.tsv/.jsonl/.json/.parquet file with the run's text columns (or a .txt file of
lines); the output is .jsonl (default: stdout), .csv or .tsv. The run directory's config.json,
labels.json and best checkpoint are all it needs (pifi_jax/train/predict.py).
"""

from absl import app, flags

from launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of a training run.", required=True)
_INPUT = flags.DEFINE_string("input", "-", "Input file, or - for lines on stdin.")
_OUTPUT = flags.DEFINE_string("output", "-", "Output .jsonl/.csv/.tsv file, or - for stdout.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Rows per batch (0 = the run's eval batch size).")


def main(argv):
    common.start(argv)
    import sys

    from pifi_jax.train.predict import Predictor

    log = lambda *args: print(*args, file=sys.stderr)  # noqa: E731 (stdout may hold the output)
    predictor = Predictor.from_workdir(_WORKDIR.value, log=log)
    records = predictor.predict_file(_INPUT.value, _OUTPUT.value, _BATCH.value)
    if _OUTPUT.value != "-":
        log(f"{len(records)} predictions ({predictor.checkpoint} checkpoint): {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
