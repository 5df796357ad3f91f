"""Kill one training run many times and check that it ends as if it had never stopped:

    python scripts/soak.py --workdir=DIR [--kills=10] [--seed=0] [--steps=300]
        [--checkpoint_uri=URI | --moto] [--reference=DIR] [-- MAIN_FLAGS ...]

The run (by default a tiny CNN-BiLSTM on the embedded FD001; after `--`, any flags of
`python -m pdm_jax.main`) is started, killed with SIGKILL once it has logged a step drawn at
random (seeded, with a random delay up to 0.3 s after it), and started again with the same
command, `--kills` times; the last start runs to the end. Each kill must leave its owner record
behind and each rerun must take it over. Then, against an uninterrupted run of the same command
(`--reference`, or one run here under DIR/reference): the final checkpoint's arrays are
bitwise identical and its meta equal, `metrics.jsonl` holds every step exactly once with the
same losses, and the parameter digests agree. Prints one JSON summary; exit code 0 when every
check holds, 1 when one does not, 2 for bad flags.

`--checkpoint_uri` puts the killed run's checkpoints elsewhere (`s3://`, `gs://`, `az://` with
their standard variables); `--moto` starts a local moto S3 server (`pip install moto[server]`)
for it and uses `s3://soak/run`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pdm_jax.errors import OneLineParser

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "--config=configs/cnn_bilstm.py",
    "--config.model.cnn_bilstm.channels=(8,)",
    "--config.model.cnn_bilstm.dilations=(1,)",
    "--config.model.cnn_bilstm.lstm_hidden=8",
    "--config.model.cnn_bilstm.dense=8",
    "--config.train.batch_size=32",
    "--config.train.eval_every=10",
    "--config.train.patience=0",
    "--config.train.tensorboard=False",
    "--config.train.plots=False",
    "--config.checkpoint.every_steps=10",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    main_flags = argv[argv.index("--") + 1 :] if "--" in argv else TINY
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="where the runs go (must not exist)")
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs before the last start")
    parser.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    parser.add_argument("--steps", type=int, default=300, help="config.train.num_steps")
    store = parser.add_mutually_exclusive_group()
    store.add_argument("--checkpoint_uri", help="the killed run's checkpoint store")
    store.add_argument("--moto", action="store_true", help="a local moto S3 server as the store")
    parser.add_argument("--reference", help="an uninterrupted run of the same command")
    parser.add_argument("--timeout_s", type=float, default=600, help="per start of the run")
    args = parser.parse_args(argv)
    if args.kills < 0 or args.steps < args.kills + 2:
        parser.error(f"need --kills >= 0 and --steps >= kills + 2, got {args.kills}/{args.steps}")
    if os.path.exists(args.workdir):
        parser.error(f"--workdir {args.workdir} exists; soak runs start from nothing")
    args.main_flags = [*main_flags, f"--config.train.num_steps={args.steps}"]
    args.main_flags.append("--config.train.log_every=1")  # the kill moments are logged steps
    return args


def _start(flags: list[str], workdir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pdm_jax.main", *flags, f"--workdir={workdir}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout_s: float) -> None:
    _, err = proc.communicate(timeout=timeout_s)
    if proc.returncode != 0:
        raise SystemExit(f"error: a run exited with {proc.returncode}: {err.strip()[-2000:]}")


def _logged_step(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [ln for ln in path.read_text().splitlines()[-3:] if ln.endswith("}")]
    return max((json.loads(ln).get("step", 0) for ln in lines), default=0)


def _kill_at(flags: list[str], workdir: Path, step: int, delay_s: float, timeout_s: float) -> int:
    """Starts the run, SIGKILLs it `delay_s` after it logged `step`; the last step it logged
    (0 if the run ended first: nothing left to kill)."""
    proc = _start(flags, workdir)
    deadline = time.monotonic() + timeout_s
    while _logged_step(workdir) < step:
        if proc.poll() is not None:
            _finish(proc, timeout_s)
            return 0
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"error: the run did not reach step {step} in {timeout_s:.0f} s")
        time.sleep(0.005)
    time.sleep(delay_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return _logged_step(workdir)


def _start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="soak",
        AWS_SECRET_ACCESS_KEY="soak",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import boto3

    for _ in range(200):
        try:
            boto3.client("s3").create_bucket(Bucket="soak")
            return server, "s3://soak/run"
        except Exception:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("error: the moto server did not start (pip install 'moto[server]')")


def _final(uri: str) -> tuple[int, list[bytes], dict[str, Any]]:
    """(step, array bytes, meta without the tracking identity) of a store's latest step."""
    import jax
    import numpy as np

    from pdm_jax import checkpoint

    with checkpoint.CheckpointStore(uri, create=False) as store:
        step = store.latest_step()
        state, meta = store.restore(None, step)
    # Not training state: a random key per run, and where the store is.
    meta.pop("tracking", None)
    meta.get("config", {}).pop("checkpoint", None)
    leaves = [np.asarray(x).tobytes() for x in jax.tree.leaves(state)]
    return int(step), leaves, meta


def _steps_and_losses(workdir: Path) -> tuple[list[int], list[float]]:
    records = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    return [r["step"] for r in train], [r["loss"] for r in train]


def soak(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(args.workdir)
    run_dir, flags = workdir / "run", list(args.main_flags)
    moto, uri = _start_moto() if args.moto else (None, args.checkpoint_uri)
    if uri:
        flags.append(f"--config.checkpoint.uri={uri}")
    try:
        started = time.monotonic()
        rng = random.Random(args.seed)
        targets = sorted(rng.sample(range(1, args.steps), args.kills))
        kills: list[dict[str, Any]] = []
        for target in targets:
            target = max(target, _logged_step(run_dir) + 1)  # each kill interrupts new work
            logged = _kill_at(flags, run_dir, target, rng.uniform(0, 0.3), args.timeout_s)
            if not logged:
                break
            left = (run_dir / "pdm-owner.json").exists()
            kills.append({"after_step": logged, "owner_record_left": left})
            print(f"killed after step {logged} ({len(kills)}/{args.kills})", file=sys.stderr)
        _finish(_start(flags, run_dir), args.timeout_s)
        reference = Path(args.reference) if args.reference else workdir / "reference"
        if not args.reference:
            _finish(_start(args.main_flags, reference), args.timeout_s)
        return _compare(run_dir, reference, uri, kills, time.monotonic() - started)
    finally:
        if moto is not None:
            moto.kill()


def _compare(
    run_dir: Path, reference: Path, uri: str | None, kills: list[dict[str, Any]], wall_s: float
) -> dict[str, Any]:
    got = _final(uri or str(run_dir / "checkpoints"))
    want = _final(str(reference / "checkpoints"))
    steps, losses = _steps_and_losses(run_dir)
    _, ref_losses = _steps_and_losses(reference)
    report = json.loads((run_dir / "report.json").read_text())
    ref_report = json.loads((reference / "report.json").read_text())
    meta_diff = sorted(k for k in set(got[2]) | set(want[2]) if got[2].get(k) != want[2].get(k))
    checks = {
        "every_kill_left_its_owner_record": all(k["owner_record_left"] for k in kills),
        "owner_record_released": not (run_dir / "pdm-owner.json").exists(),
        "final_step_equal": got[0] == want[0],
        "checkpoint_arrays_bitwise_equal": got[1] == want[1],
        "checkpoint_meta_equal": not meta_diff,
        "metrics_each_step_once": steps == list(range(1, len(ref_losses) + 1)),
        "losses_equal": losses == ref_losses,
        "params_sha256_equal": report["params_sha256"] == ref_report["params_sha256"],
    }
    return {
        "ok": all(checks.values()),
        "checks": checks,
        "kills": kills,
        "meta_keys_that_differ": meta_diff,
        "store": uri or "local",
        "wall_s": round(wall_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    summary = soak(parse_args(argv))
    print(json.dumps(summary, indent=1))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
