import gzip
import hashlib

import numpy as np
import pytest

from pdm_jax.data import cmapss
from pdm_jax.errors import DataError

# (train units, train rows, test units, test rows) from SOURCE.md
COUNTS = {
    "FD001": (100, 20631, 100, 13096),
    "FD002": (260, 53759, 259, 33991),
    "FD003": (100, 24720, 100, 16596),
    "FD004": (249, 61249, 248, 41214),
}


def test_embedded_fd001_matches_source_checksums():
    for name in cmapss.subset_files("FD001"):
        with gzip.open(cmapss.EMBEDDED_DIR / f"{name}.gz", "rb") as handle:
            assert hashlib.sha256(handle.read()).hexdigest() == cmapss.SHA256[name]
    # The citation and licence travel with the data.
    source = (cmapss.EMBEDDED_DIR / "SOURCE.md").read_text()
    assert "Saxena" in source and "public domain" in source


def test_embedded_is_the_default_for_fd001():
    directory, suffix = cmapss.locate("FD001")
    assert directory == cmapss.EMBEDDED_DIR and suffix == ".gz"


@pytest.mark.parametrize("subset", sorted(COUNTS))
def test_subset_counts_and_rul(subset, cmapss_dir):
    data = cmapss.load_cmapss(subset, cmapss_dir)
    n_train, rows_train, n_test, rows_test = COUNTS[subset]
    assert (data.train.num_units, data.train.num_rows) == (n_train, rows_train)
    assert (data.test.num_units, data.test.num_rows) == (n_test, rows_test)
    frame = data.train.frame
    last = frame.groupby("unit").tail(1)
    assert (last["rul"] == 0).all()  # training units run to failure
    first = frame.groupby("unit").head(1)
    assert (first["rul"].to_numpy() == frame.groupby("unit").size().to_numpy() - 1).all()
    truth = np.loadtxt(cmapss_dir / f"RUL_{subset}.txt")
    test_last = data.test.frame.groupby("unit").tail(1)["rul"].to_numpy()
    np.testing.assert_array_equal(test_last, truth)
    assert data.train.sensors == cmapss.INFORMATIVE_SENSORS


def test_embedded_equals_shared_copy(cmapss_dir):
    embedded = cmapss.load_cmapss("FD001")
    shared = cmapss.load_cmapss("FD001", cmapss_dir)
    assert embedded.train.frame.equals(shared.train.frame)
    assert embedded.test.frame.equals(shared.test.frame)


def test_env_var_is_searched(cmapss_dir, monkeypatch):
    monkeypatch.setenv("PDM_DATA_DIR", str(cmapss_dir))
    assert cmapss.locate("FD003") == (cmapss_dir, "")


def test_missing_subset_names_the_download_command(tmp_path):
    with pytest.raises(DataError, match=r"C-MAPSS FD002 not found.*download_cmapss.py"):
        cmapss.locate("FD002")
    with pytest.raises(DataError, match=r"train_FD002.txt.*--dest="):
        cmapss.locate("FD002", tmp_path)
    with pytest.raises(DataError, match="unknown C-MAPSS subset 'FD005'"):
        cmapss.locate("FD005")


def test_cache_dir_is_used(tmp_path, monkeypatch, cmapss_dir):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = cmapss.cache_dir()
    cache.mkdir(parents=True)
    for name in cmapss.subset_files("FD003"):
        (cache / name).write_bytes((cmapss_dir / name).read_bytes())
    assert cmapss.locate("FD003") == (cache, "")
