"""A checkpoint disk that fills up mid-run: a real size-limited tmpfs, mounted for the run.

The run and the check after it share one private mount namespace (`unshare --mount`, with a
user namespace when not root), so the tmpfs is the machine's real ENOSPC path through
TensorStore and Orbax and vanishes with the test, without touching the host's mounts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

from tests.conftest import REPO, TINY_RUN_FLAGS
from tests.test_parallel import _env

# Room for three steps of the tiny model (about 190 KB each on tmpfs) and not a fourth.
TMPFS_SIZE = "600k"

CHECK = """
import json, os, sys
from pdm_jax import checkpoint
uri = sys.argv[1]
with checkpoint.CheckpointStore(uri, create=False) as store:
    state, meta = store.restore(None)
print(json.dumps({"restored": meta["step"], "entries": sorted(os.listdir(uri))}))
"""


def _namespace() -> list[str]:
    assert shutil.which("unshare"), "util-linux's unshare is needed to mount a private tmpfs"
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, "--mount"]


def test_a_full_disk_ends_the_run_in_one_line_and_keeps_the_last_complete_step(tmp_path):
    disk, workdir = tmp_path / "disk", tmp_path / "run"
    disk.mkdir()
    store = disk / "checkpoints"
    run = [
        sys.executable,
        "-m",
        "pdm_jax.main",
        *TINY_RUN_FLAGS,
        "--config.train.num_steps=120",
        f"--config.checkpoint.uri={store}",
        f"--workdir={workdir}",
    ]
    script = (
        f'mount -t tmpfs -o size={TMPFS_SIZE} tmpfs "{disk}" || exit 90; '
        '"$@" > "$0" 2>&1; echo "exit=$?"; '
        f'"{sys.executable}" -c \'{CHECK}\' "{store}"'
    )
    proc = subprocess.run(
        [*_namespace(), "bash", "-c", script, str(tmp_path / "out.txt"), *run],
        cwd=REPO,
        env=_env(1),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 90, f"could not mount a tmpfs: {proc.stderr[-2000:]}"
    code, check = proc.stdout.strip().splitlines()[-2:]
    out = (tmp_path / "out.txt").read_text()
    assert code == "exit=2", out[-3000:] + proc.stderr[-3000:]
    # One error line (Orbax's own threads log their failures too, before and after it).
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out[-3000:]
    error = errors[0]
    assert error.startswith(f"error: checkpoint storage {store} is full (No space left on device)")
    match = re.search(
        r"saving step\(s\) \d+, \d+, \d+ failed; the latest complete step is (\d+)\.", error
    )
    assert match, error
    found = json.loads(check)
    # The last complete step restores, and nothing half-written is left beside the steps.
    assert found["restored"] == int(match[1]) > 0
    assert all(name.isdigit() for name in found["entries"]), found["entries"]
    assert max(map(int, found["entries"])) == found["restored"]
    assert not (workdir / "report.json").exists()
    assert not (workdir / "pdm-owner.json").exists()  # released on the way out
