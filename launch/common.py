"""What every launcher shares: the --config flag and the start of main()."""

from absl import app, flags, logging
from ml_collections import config_flags


def config_flag(default: str, help_text: str = "Run configuration."):
    """`--config=FILE[:ARGS]` plus `--config.x.y=value` overrides, locked (a typo is an error)."""
    return config_flags.DEFINE_config_file("config", default, help_text, lock_config=True)


def start(argv) -> None:
    """Refuses stray positional arguments; quiets absl logging to warnings unless --verbosity is
    given (orbax logs every file it writes at INFO)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
