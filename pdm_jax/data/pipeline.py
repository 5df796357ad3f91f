"""Sliding windows as index ranges, and the grain pipeline that turns them into training batches.

Windows are never materialised: a window is the row index of its last step in one contiguous
feature array, and a batch is gathered from that array with one vectorised index. Training order
is a pure function of (seed, epoch) and the global batch size (DESIGN.md invariant 1): global
batch k is the k-th slice of the epoch's permutation, and each host takes its contiguous share of
it, so the union over hosts is the single-host batch whatever the host or device count. The
position is therefore one integer, saved as JSON and restored in any process and on any layout.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from pdm_jax.errors import ConfigError, DataError

STATE_VERSION = 1
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Windows:
    """Windows of length `window` ending at rows `ends` of `features`.

    `row_start[r]` is the first row of row r's unit; steps before it are left padding (zeros,
    mask False), so a unit shorter than the window still yields a window.
    """

    features: np.ndarray  # [rows, F] float32
    targets: np.ndarray  # [rows] float32 (capped RUL; NaN where unknown)
    row_start: np.ndarray  # [rows] int64
    row_unit: np.ndarray  # [rows] int32 unit code
    row_dataset: np.ndarray  # [rows] int32
    row_time: np.ndarray  # [rows] float64
    ends: np.ndarray  # [num_windows] int64
    window: int

    def __len__(self) -> int:
        return len(self.ends)

    @property
    def num_padded(self) -> int:
        """Windows that start before their unit does (left-padded)."""
        return int((self.ends - self.row_start[self.ends] + 1 < self.window).sum())

    def gather(self, ids: np.ndarray) -> Batch:
        """The batch of windows `ids`: x [B, W, F], mask [B, W], y [B], unit, dataset, time."""
        ends = self.ends[ids]
        offsets = np.arange(1 - self.window, 1, dtype=np.int64)
        rows = ends[:, None] + offsets[None, :]
        mask = rows >= self.row_start[ends][:, None]
        rows = np.where(mask, rows, ends[:, None])
        x = self.features[rows]
        x[~mask] = 0.0
        return {
            "x": x,
            "mask": mask,
            "y": self.targets[ends],
            "unit": self.row_unit[ends],
            "dataset": self.row_dataset[ends],
            "time": self.row_time[ends],
        }


def window_ends(
    unit_starts: np.ndarray,
    unit_stops: np.ndarray,
    window: int,
    stride: int,
    mode: str,
    min_history: int | None = None,
) -> np.ndarray:
    """Row index of each window's last step.

    mode 'train': every `stride`-th window of each unit with at least `min_history` rows of
    history (default: a full window), counted back from its last row so the failure always
    appears; shorter histories than the window are left-padded and masked, as test units shorter
    than the window are, so the model has seen such inputs; a unit shorter than `min_history`
    gives one padded window.
    mode 'last': each unit's last row (the evaluation point of a test unit).
    mode 'all': every row (a prediction per time step; early ones padded).
    """
    if window < 1 or stride < 1:
        raise ConfigError(f"window and stride must be >= 1, got window={window}, stride={stride}")
    starts = np.asarray(unit_starts, np.int64)
    stops = np.asarray(unit_stops, np.int64)
    if mode == "last":
        return stops - 1
    if mode == "all":
        return np.arange(starts[0] if len(starts) else 0, stops[-1] if len(stops) else 0)
    if mode != "train":
        raise ValueError(f"unknown window mode {mode!r}")
    shortest = window if min_history is None else max(1, min(int(min_history), window))
    lengths = stops - starts
    counts = np.where(lengths >= shortest, (lengths - shortest) // stride + 1, 1)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    back = (np.arange(counts.sum()) - first) * stride
    ends = np.repeat(stops - 1, counts) - back
    # Emit in row order so windows of a unit are ascending.
    return np.sort(ends)


class BatchOrder:
    """Global batch k -> window ids, a pure function of (seed, epoch, global batch size)."""

    def __init__(self, num_windows: int, global_batch: int, seed: int, shuffle: bool = True):
        if global_batch < 1:
            raise ConfigError(f"config.train.batch_size must be >= 1, got {global_batch}")
        if num_windows < global_batch:
            raise DataError(
                f"only {num_windows} training windows, fewer than one global batch "
                f"({global_batch}); lower config.train.batch_size or add data"
            )
        self.num_windows = num_windows
        self.global_batch = global_batch
        self.seed = seed
        self.shuffle = shuffle
        self.batches_per_epoch = num_windows // global_batch
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._cache.get(epoch)
            if perm is None:
                if self.shuffle:
                    rng = np.random.default_rng([self.seed, epoch])
                    perm = rng.permutation(self.num_windows)
                else:
                    perm = np.arange(self.num_windows)
                if len(self._cache) >= 2:  # prefetch threads straddle at most two epochs
                    self._cache.pop(min(self._cache))
                self._cache[epoch] = perm
            return perm

    def batch_ids(self, k: int) -> np.ndarray:
        epoch, b = divmod(k, self.batches_per_epoch)
        return self.permutation(epoch)[b * self.global_batch : (b + 1) * self.global_batch]


def host_share(global_batch: int, host_index: int, host_count: int) -> slice:
    """This host's contiguous part of every global batch."""
    if host_count < 1 or not 0 <= host_index < host_count:
        raise ConfigError(f"host {host_index} of {host_count} is not a valid process layout")
    if global_batch % host_count:
        raise ConfigError(
            f"config.train.batch_size={global_batch} is not divisible by the {host_count} hosts"
        )
    per = global_batch // host_count
    return slice(host_index * per, (host_index + 1) * per)


class TrainIterator:
    """An endless, checkpointable stream of this host's share of each global batch.

    Backed by a grain `MapDataset` over global batch indices, prefetched in threads; its state is
    `{"next_batch": k, ...}` as plain JSON, and `set_state` in a fresh process (any host count)
    continues with exactly the batches that would have come next.
    """

    def __init__(
        self,
        windows: Windows,
        global_batch: int,
        seed: int,
        host_index: int = 0,
        host_count: int = 1,
        num_threads: int = 1,
        prefetch: int = 4,
        shuffle: bool = True,
    ):
        self.windows = windows
        self.order = BatchOrder(len(windows), global_batch, seed, shuffle)
        self.share = host_share(global_batch, host_index, host_count)
        self._read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._start(0)

    # A practically endless range: grain's map dataset is lazy, so its length costs nothing.
    _MAX_BATCHES = 2**62

    def _load(self, k: int) -> Batch:
        ids = self.order.batch_ids(k)[self.share]
        batch = self.windows.gather(ids)
        batch["step"] = np.int64(k)
        return batch

    def _start(self, next_batch: int) -> None:
        dataset = grain.MapDataset.range(next_batch, self._MAX_BATCHES).map(self._load)
        self._iter = iter(dataset.to_iter_dataset(self._read))
        self._next = next_batch

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = next(self._iter)
        self._next += 1
        return batch

    @property
    def epoch(self) -> int:
        return self._next // self.order.batches_per_epoch

    def get_state(self) -> dict[str, Any]:
        """JSON-able position: the next global batch and what the order depends on."""
        return {
            "version": STATE_VERSION,
            "next_batch": int(self._next),
            "epoch": int(self.epoch),
            "batch_in_epoch": int(self._next % self.order.batches_per_epoch),
            "seed": int(self.order.seed),
            "global_batch": int(self.order.global_batch),
            "num_windows": int(self.order.num_windows),
            "shuffle": bool(self.order.shuffle),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a saved position; refuses one that would give a different order."""
        if state.get("version") != STATE_VERSION:
            raise DataError(
                f"data position has version {state.get('version')}, expected {STATE_VERSION}"
            )
        mine = self.get_state()
        for key in ("seed", "global_batch", "num_windows", "shuffle"):
            if state[key] != mine[key]:
                raise DataError(
                    f"saved data position has {key}={state[key]!r} but this run has {mine[key]!r}; "
                    "the batch order would differ"
                )
        self._start(int(state["next_batch"]))


def eval_batches(windows: Windows, batch_size: int) -> Iterator[Batch]:
    """All windows in order, in fixed-shape batches; the last is padded, `valid` marks real rows.

    One shape means one compiled function serves the whole evaluation.
    """
    n = len(windows)
    for start in range(0, n, batch_size):
        ids = np.arange(start, min(start + batch_size, n))
        valid = np.ones(batch_size, dtype=bool)
        if len(ids) < batch_size:
            valid[len(ids) :] = False
            ids = np.concatenate([ids, np.full(batch_size - len(ids), ids[-1])])
        batch = windows.gather(ids)
        batch["valid"] = valid
        yield batch
