"""NASA C-MAPSS turbofan data (FD001-FD004): where the files are, and how they are parsed.

FD001 ships inside the package (gzipped, public domain; see embedded/SOURCE.md) so the main job
trains offline on a fresh machine. The other subsets come from `data_dir`, `$PDM_DATA_DIR` or
the user cache, where `download.download_cmapss` puts NASA's files after checking their sha256.
"""

from __future__ import annotations

import logging
import os
import pathlib

import numpy as np
import pandas as pd

from pdm_jax.data import validate
from pdm_jax.data.table import BASELINE_SUFFIX, DATASET, RUL, TIME, UNIT, RawData, RunTable
from pdm_jax.errors import DataError

log = logging.getLogger(__name__)

SUBSETS = ("FD001", "FD002", "FD003", "FD004")
SETTINGS = ("setting_1", "setting_2", "setting_3")
ALL_SENSORS = tuple(f"s_{i}" for i in range(1, 22))
COLUMNS = ("unit", "cycle", *SETTINGS, *ALL_SENSORS)
# The 14 sensors that carry information in every subset (DESIGN.md, C-MAPSS protocol).
INFORMATIVE_SENSORS = tuple(f"s_{i}" for i in (2, 3, 4, 7, 8, 9, 11, 12, 13, 14, 15, 17, 20, 21))

# What each column measures (Saxena et al., PHM08, table 2), for labels a maintenance engineer
# reads without the paper at hand.
DESCRIPTIONS = {
    "setting_1": "altitude",
    "setting_2": "Mach number",
    "setting_3": "throttle resolver angle",
    "s_1": "T2 (fan inlet temperature)",
    "s_2": "T24 (LPC outlet temperature)",
    "s_3": "T30 (HPC outlet temperature)",
    "s_4": "T50 (LPT outlet temperature)",
    "s_5": "P2 (fan inlet pressure)",
    "s_6": "P15 (bypass-duct pressure)",
    "s_7": "P30 (HPC outlet pressure)",
    "s_8": "Nf (fan speed)",
    "s_9": "Nc (core speed)",
    "s_10": "epr (engine pressure ratio)",
    "s_11": "Ps30 (HPC outlet static pressure)",
    "s_12": "phi (fuel flow / Ps30)",
    "s_13": "NRf (corrected fan speed)",
    "s_14": "NRc (corrected core speed)",
    "s_15": "BPR (bypass ratio)",
    "s_16": "farB (burner fuel-air ratio)",
    "s_17": "htBleed (bleed enthalpy)",
    "s_18": "Nf_dmd (demanded fan speed)",
    "s_19": "PCNfR_dmd (demanded corrected fan speed)",
    "s_20": "W31 (HPT coolant bleed)",
    "s_21": "W32 (LPT coolant bleed)",
    "time": "(age in cycles)",
}


def label(name: str) -> str:
    """'s_9 Nc (core speed)' for 's_9'; a baseline input says what it is; other names as given."""
    if name.endswith(BASELINE_SUFFIX):
        return f"{label(name[: -len(BASELINE_SUFFIX)])}, change since early life"
    description = DESCRIPTIONS.get(name)
    return f"{name} {description}" if description else name


# sha256 of the original text files, from shared/data/cmapss/SOURCE.md.
SHA256 = {
    "train_FD001.txt": "963b5e22825b34d8b21c69e1aeb4af3e647050eb672ee8834ba4b5d91d2de0f8",
    "test_FD001.txt": "3cda7109ce17bafb5443f2ac926cfcf88154b941b8c4cf95eb55d1ddd6f52851",
    "RUL_FD001.txt": "a19c8ec94931949d0485bdc35118206e9c81c4547b422efb9cf86f4ceddbceca",
    "train_FD002.txt": "dac6c4dbc4e7c1bdeb5747da3d313d05c395bb99801b44a002b26a2ba13d788f",
    "test_FD002.txt": "de7b5bf7e998a985c378488480528b7c02cff1406a46740def362dda8d9b4e02",
    "RUL_FD002.txt": "c851dd96a6ea6998d3c4a8f834d3c8013aa90e93a6ed950dc826ad0655b2906b",
    "train_FD003.txt": "2abbe9968cc5e8eb091980f51b20f62bb4127336d3482cb52071d53bf23329e2",
    "test_FD003.txt": "299babd63c8d987cef079c4a425429f33b3a34797d803bbe2ad48c29dbd0d790",
    "RUL_FD003.txt": "df1e0566306b174a2de41c67a3e7a51877889598b78643fc3e5685259091b7cb",
    "train_FD004.txt": "27ef6160b6a1dcb2613a88de9c239f763b223f02cdc41dc5cdedc5dc189b6218",
    "test_FD004.txt": "1dc675fff0624bac10786927c6715b37d1297657137400d2b1a3138d777a3ba5",
    "RUL_FD004.txt": "196b836b85a95ac7fdbbf29c5fdf1657382eafa445644d114ffaaf50dc2975e1",
}

EMBEDDED_DIR = pathlib.Path(__file__).parent / "embedded"
EMBEDDED_SUBSETS = ("FD001",)
ENV_DATA_DIR = "PDM_DATA_DIR"


def subset_files(subset: str) -> tuple[str, str, str]:
    check_subset(subset)
    return f"train_{subset}.txt", f"test_{subset}.txt", f"RUL_{subset}.txt"


def check_subset(subset: str) -> None:
    if subset not in SUBSETS:
        raise DataError(f"unknown C-MAPSS subset {subset!r}: expected one of {', '.join(SUBSETS)}")


def cache_dir() -> pathlib.Path:
    """Per-user cache for downloaded subsets ($XDG_CACHE_HOME/pdm_jax/cmapss)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "pdm_jax" / "cmapss"


def _has_files(directory: pathlib.Path, subset: str, suffix: str = "") -> bool:
    return all((directory / (f + suffix)).is_file() for f in subset_files(subset))


def locate(subset: str, data_dir: str | os.PathLike | None = None) -> tuple[pathlib.Path, str]:
    """Finds a subset's three files: (directory, filename suffix).

    Order: an explicit `data_dir` (an error if the files are not there: the user asked for it),
    then $PDM_DATA_DIR, the embedded copy (FD001), and the user cache. Raises DataError with the
    download command when none has them.
    """
    check_subset(subset)
    if data_dir:
        directory = pathlib.Path(data_dir).expanduser()
        if _has_files(directory, subset):
            return directory, ""
        if _has_files(directory, subset, ".gz"):
            return directory, ".gz"
        missing = [f for f in subset_files(subset) if not (directory / f).is_file()]
        raise DataError(
            f"{directory}: C-MAPSS {subset} file(s) not found: {', '.join(missing)} "
            f"(fetch them with: python scripts/download_cmapss.py --dest={directory})"
        )
    candidates: list[tuple[pathlib.Path, str]] = []
    if os.environ.get(ENV_DATA_DIR):
        candidates.append((pathlib.Path(os.environ[ENV_DATA_DIR]).expanduser(), ""))
    if subset in EMBEDDED_SUBSETS:
        candidates.append((EMBEDDED_DIR, ".gz"))
    candidates.append((cache_dir(), ""))
    for directory, suffix in candidates:
        if _has_files(directory, subset, suffix):
            return directory, suffix
    searched = ", ".join(str(d) for d, _ in candidates)
    raise DataError(
        f"C-MAPSS {subset} not found (searched {searched}); download it with: "
        "python scripts/download_cmapss.py, or pass --data_dir"
    )


def read_history(path: pathlib.Path) -> pd.DataFrame:
    """Parses one train_/test_ file into a frame with the 26 named columns."""
    frame = validate.read_whitespace_table(path, COLUMNS)
    check_ids(frame, validate.display_name(path))
    return frame


def check_ids(frame: pd.DataFrame, name: str) -> None:
    """Unit and cycle of a C-MAPSS text file are positive integers (also checked per chunk)."""
    for col in ("unit", "cycle"):
        values = frame[col].to_numpy()
        bad = (values != np.round(values)) | (values < 1)
        if bad.any():
            pos = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{name}: line {frame.index[pos]}, column '{col}': expected a positive integer"
            )


def read_rul(path: pathlib.Path) -> np.ndarray:
    frame = validate.read_whitespace_table(path, ("rul",))
    return frame["rul"].to_numpy(dtype=np.float64)


def _to_table(
    frame: pd.DataFrame,
    name: str,
    sensors: tuple[str, ...],
    nan_policy: str,
    final_rul: np.ndarray | None,
    rul_name: str = "",
) -> RunTable:
    """Validates a parsed history and computes RUL: train runs to failure; test ends `final_rul`
    cycles before failure."""
    validate.check_units_and_time(frame, name, "unit", "cycle")
    frame, _ = validate.apply_nan_policy(frame, SETTINGS + sensors, nan_policy, name, "unit")
    units = frame["unit"].to_numpy().astype(np.int64)
    labels = np.unique(units)
    expected = np.arange(1, labels.max() + 1)
    if len(labels) != len(expected):
        absent = np.setdiff1d(expected, labels)[0]
        raise DataError(f"{name}: unit {absent} has no rows (units must run 1..{labels.max()})")
    codes = units - 1
    cycles = frame["cycle"].to_numpy(dtype=np.float64)
    last = pd.Series(cycles).groupby(codes).transform("max").to_numpy()
    rul = last - cycles
    if final_rul is not None:
        validate.check_rul_truth(final_rul, len(labels), rul_name)
        rul = rul + final_rul[codes]
    out = pd.DataFrame({UNIT: codes, TIME: cycles, DATASET: np.zeros(len(frame), dtype=np.int32)})
    for col in SETTINGS + sensors:
        out[col] = frame[col].to_numpy(dtype=np.float64)
    out[RUL] = rul
    out = out.sort_values([UNIT, TIME], kind="stable").reset_index(drop=True)
    return RunTable(
        frame=out,
        settings=SETTINGS,
        sensors=sensors,
        unit_labels=labels,
        unit_dataset=np.zeros(len(labels), dtype=np.int32),
        name=name,
    )


def load_cmapss(
    subset: str = "FD001",
    data_dir: str | os.PathLike | None = None,
    sensors: tuple[str, ...] = INFORMATIVE_SENSORS,
    nan_policy: str = "error",
) -> RawData:
    """Loads a subset's train and test histories with uncapped RUL truth at every row."""
    directory, suffix = locate(subset, data_dir)
    train_f, test_f, rul_f = (directory / (f + suffix) for f in subset_files(subset))
    unknown = [s for s in sensors if s not in ALL_SENSORS]
    if unknown:
        raise DataError(
            f"C-MAPSS has no sensor column(s) {', '.join(map(repr, unknown))}: expected names "
            "s_1 … s_21"
        )
    log.info("C-MAPSS %s from %s", subset, directory)
    train = _to_table(read_history(train_f), str(train_f), sensors, nan_policy, None)
    test_frame = read_history(test_f)
    final_rul = read_rul(rul_f)
    test = _to_table(test_frame, str(test_f), sensors, nan_policy, final_rul, str(rul_f))
    return RawData(train=train, test=test, dataset_names=(subset,))
