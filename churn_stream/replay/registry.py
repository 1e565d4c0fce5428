"""Which reader replays what: dataset names, ``name:path`` forms and plain paths.

- ``kdd2015`` / ``kdd2015:DIR``: the KDD Cup 2015 course files and ``truth_train.csv``;
- ``telco`` / ``telco:FILE``: IBM's Telco customer table;
- a directory of ``trainCourse<N>.csv[.gz]`` files: the KDD reader;
- a ``.json`` or ``.toml`` mapping whose ``path`` names the data file: the generic reader;
- any other file: the generic reader, with the mapping from ``config``.

Bare names look in ``DATA_ROOT`` (the shared data folder beside the repository) unless
``data_root`` says otherwise.
"""

import logging
from pathlib import Path

from churn_stream.errors import ConfigurationError
from churn_stream.replay.base import ReplaySource
from churn_stream.replay.generic import GenericSource, load_spec
from churn_stream.replay.kdd2015 import Kdd2015Source
from churn_stream.replay.telco import FILE_NAME as TELCO_FILE
from churn_stream.replay.telco import telco_source

log = logging.getLogger(__name__)

DATA_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data"
DATASETS = {
    "kdd2015": "KDD Cup 2015 learner activity and dropout (folder kddcup2015/)",
    "telco": "IBM Telco customer profiles and churn (ibm-telco/Telco-Customer-Churn.csv)",
}
CONFIG_SUFFIXES = (".json", ".toml")


def open_replay(
    name_or_path: str,
    config: Path | None = None,
    data_root: Path = DATA_ROOT,
    limit_users: int | None = None,
    seed: int = 0,
) -> ReplaySource:
    """The replay source that ``name_or_path`` names, limited to a seeded user subset if asked."""
    source = _resolve(name_or_path, config, data_root)
    if limit_users is not None:
        source.limit_users(limit_users, seed)
        log.info("replay %s limited to %d users (seed %d)", source.name, limit_users, seed)
    return source


def _resolve(name_or_path: str, config: Path | None, data_root: Path) -> ReplaySource:
    name, _, where = name_or_path.partition(":")
    if name == "kdd2015":
        return Kdd2015Source(Path(where) if where else data_root / "kddcup2015")
    if name == "telco":
        return telco_source(Path(where) if where else data_root / "ibm-telco" / TELCO_FILE)
    path = Path(name_or_path)
    if path.is_dir():
        return Kdd2015Source(path)
    if config is not None:
        spec = load_spec(config)
        return GenericSource(spec.model_copy(update={"path": path}))
    if path.suffix in CONFIG_SUFFIXES and path.is_file():
        return GenericSource(load_spec(path))
    if path.is_file():
        raise ConfigurationError(
            f"{path} needs a column mapping: pass --replay-config FILE.json|toml "
            "(see churn_stream/replay/generic.py)"
        )
    raise ConfigurationError(
        f"no replay named {name_or_path!r}: use one of {sorted(DATASETS)}, NAME:PATH, "
        "a KDD course folder, a mapping file, or a data file with --replay-config"
    )
