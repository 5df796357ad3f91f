"""Shared defaults for every pdm-jax run; model configs start from `get_config()` here.

Keys documented here are a public contract (scripts, docs and users' command lines use them):
override any of them as `--config.<key>=<value>`, tuples as
`--config.data.columns.settings="('a','b')"`.
Hardware-dependent fields default to 'auto' and are resolved at start-up (and logged).
"""

import ml_collections
from ml_collections import config_dict

from pdm_jax.data.download import DEFAULT_URL


def auto() -> config_dict.FieldReference:
    """A field that is 'auto' (decided at start-up from the hardware, then logged) or a value."""
    return config_dict.FieldReference("auto", field_type=object)


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = "tft"  # 'tft' | 'cnn_bilstm'
    config.model.quantiles = (0.1, 0.5, 0.9)
    config.model.dropout = 0.1
    # Model outputs are the head's values times this, so the head learns smaller targets: at 1,
    # C-MAPSS training sits on a long plateau first; at the RUL cap (125) it learns at once but
    # overfits sooner (measured on FD001, see experiments/README.md).
    config.model.target_scale = 1.0
    config.model.target_offset = 0.0  # cycles added to the scaled head (e.g. mid RUL range)
    config.model.point_loss = "mse"  # point heads (quantiles=()): 'mse' | 'huber'
    config.model.huber_delta = 10.0  # cycles, for 'huber'
    # Members trained side by side on the same batches (each with its own initialisation and
    # dropout), their outputs averaged, at about that many times the training compute. On FD001
    # three members improved validation but not the test units (experiments/README.md), so it is
    # off by default. 1: a single model.
    config.model.ensemble = 1
    # Gradient checkpointing per block (TFT: 'vsn', 'lstm', 'attention'; CNN-BiLSTM: 'conv',
    # 'lstm') and the jax.checkpoint policy used for them; 'auto': on only when memory is short.
    config.model.remat = auto()
    config.model.remat_policy = "nothing_saveable"
    config.model.tft = ml_collections.ConfigDict()
    config.model.tft.hidden = 64
    config.model.tft.heads = 4
    config.model.tft.var_hidden = 32  # per-variable ("continuous") hidden size
    config.model.tft.lstm_layers = 1
    config.model.cnn_bilstm = ml_collections.ConfigDict()
    config.model.cnn_bilstm.channels = (64, 64)
    config.model.cnn_bilstm.kernel = 3
    config.model.cnn_bilstm.dilations = (1, 1)
    config.model.cnn_bilstm.activation = "relu"  # 'relu' | 'gelu' | 'tanh' | 'elu'
    config.model.cnn_bilstm.lstm_hidden = 64  # per direction
    config.model.cnn_bilstm.lstm_layers = 1
    config.model.cnn_bilstm.pooling = "last"  # 'last' | 'mean' | 'max' (masked)
    config.model.cnn_bilstm.dense = 64

    data = config.data = ml_collections.ConfigDict()
    data.source = "cmapss"  # 'cmapss' | 'csv' | 'synthetic'
    data.subset = "FD001"  # C-MAPSS FD001..FD004; FD001 ships with the package
    data.data_dir = config_dict.placeholder(str)  # else $PDM_DATA_DIR, embedded FD001, user cache
    data.download = True  # fetch a missing C-MAPSS subset into the user cache (sha256-checked)
    data.download_url = DEFAULT_URL  # NASA's public "Turbofan Engine Degradation Simulation" zip
    data.paths = ()  # csv: files or globs (.csv/.parquet); each entry is one dataset
    data.test_paths = ()  # csv: test units of dataset i in entry i (RUL truth from columns.rul)
    data.columns = ml_collections.ConfigDict()
    data.columns.unit = "unit"
    data.columns.time = "time"
    data.columns.settings = ()  # operating settings (used to find operating conditions)
    data.columns.sensors = config_dict.FieldReference(
        "auto", field_type=object
    )  # tuple, or 'auto': C-MAPSS' 14 informative / every other numeric
    data.columns.failure = config_dict.placeholder(str)  # optional 0/1 failure flag column
    data.columns.rul = config_dict.placeholder(str)  # optional explicit RUL column
    data.columns.ignore = ()  # extra columns to leave out
    data.use_settings = False  # feed the settings to the model as inputs too
    data.use_time = False  # feed each row's time index (the unit's age) as an input too
    # > 0: each sensor also enters as its change since the unit's own early-life level (the mean
    # of its first N cycles, of fewer while the unit is younger): engines start with different
    # wear and manufacturing offsets, about a fifth of FD001's whole degradation trend, that a
    # window of readings alone cannot tell from wear. 0 = off.
    data.baseline_cycles = 0
    data.rul_cap = 125.0  # piecewise-linear target; 0 = uncapped
    data.nan_policy = "error"  # 'error' | 'ffill' (forward-fill within a unit, count logged)
    data.condition_scaling = "auto"  # per-operating-condition scaling: 'auto' | True | False
    data.val_fraction = 0.2  # share of training units held out (by unit) for validation
    data.window = 30
    # Shortest history (cycles) a training/validation window may have (capped at the window):
    # shorter ones are left-padded and masked, like test units shorter than the window, so the
    # model learns such inputs. 0: full windows only.
    data.min_history = 0
    data.stride = 1
    data.num_threads = auto()  # grain prefetch threads; 'auto': 1 on CPU (in memory, GIL-bound)
    data.prefetch = 4  # batches prefetched ahead of the training step
    data.synthetic = ml_collections.ConfigDict()
    data.synthetic.num_units = 200
    data.synthetic.test_units = 100
    data.synthetic.num_conditions = 1
    data.synthetic.seed = 0

    train = config.train = ml_collections.ConfigDict()
    train.num_steps = 0  # 0 = until early stopping / num_epochs
    train.num_epochs = 30
    train.batch_size = 256  # global batch: fixed by the config, never by the hardware
    # Microbatches per update: per-device batch = batch_size / (data-parallel size * grad_accum);
    # 'auto' picks the smallest that fits device memory.
    train.grad_accum = auto()
    train.learning_rate = 1e-3
    train.weight_decay = 1e-4  # AdamW's decoupled weight decay
    # > 0: evaluate, select and report a Polyak average of the params. Its decay warms up as
    # min(ema_decay, (1 + t) / (10 + t)), so until step ~10 / (1 - ema_decay) (5,000 at 0.998)
    # the average spans roughly the last t / 10 steps whatever the setting.
    train.ema_decay = 0.0
    # Std of Gaussian noise added to the scaled readings of each training window every step
    # (padding excluded; evaluation and prediction never see it). Scaled readings span [-1, 1];
    # C-MAPSS FD001's own cycle-to-cycle sensor noise there is 0.03-0.18. 0 = off.
    train.input_noise = 0.0
    train.clip_norm = 1.0  # global-norm gradient clipping; 0 = off
    train.schedule = "cosine"  # 'cosine' | 'linear' | 'constant', after linear warm-up
    train.warmup_steps = 100
    train.schedule_steps = 5000  # the LR schedule's own length, independent of num_steps
    # p10-p90 bands for both model kinds (pdm_jax/calibration.py): 'conformal' shifts the band
    # (a point model's: its prediction) by split-conformal quantiles fitted on validation units
    # with each best step and saved in the checkpoint; 'none' leaves the model's own quantiles.
    train.calibration = "conformal"
    # What early stopping and best-step selection score on the validation units: 'all' windows, or
    # only the 'degrading' ones (truth below data.rul_cap), leaving out the healthy early life
    # that test units cut part way through their life mostly lack.
    train.select_on = "all"
    train.patience = 10  # evaluations without improvement before early stopping
    train.eval_every = 200
    train.log_every = 50  # steps between train-loss lines in metrics.jsonl / TensorBoard
    train.tensorboard = True  # TensorBoard event files under <workdir>/tb
    # PNG plots under <workdir>/plots after training and --mode=eval (pdm_jax/report.py); a
    # plotting failure only logs a warning. False skips them (and matplotlib's import).
    train.plots = True

    config.compute = ml_collections.ConfigDict()
    config.compute.dtype = "auto"  # 'auto' | 'float32' | 'bfloat16'
    config.compute.mesh = auto()  # (data, model) device counts; model is reserved (1)
    # Windows per chunk of an evaluation/prediction batch (0: the whole batch at once); 'auto':
    # cache-sized chunks for the TFT on CPU, off elsewhere. Results are the same either way.
    config.compute.infer_microbatch = auto()
    config.compute.xla_flags = "auto"  # extra XLA flags for this platform; '' = none
    config.compute.compilation_cache = "auto"  # persistent compile cache dir; '' = off

    # Multi-host: empty = single process, or whatever JAX detects (SLURM, MPI, TPU pods).
    dist = config.distributed = ml_collections.ConfigDict()
    dist.coordinator = config_dict.placeholder(str)  # 'host:port' of process 0
    dist.num_processes = 0  # 0 = detect
    dist.process_id = -1  # -1 = detect
    dist.timeout_s = 300

    ckpt = config.checkpoint = ml_collections.ConfigDict()
    ckpt.uri = config_dict.placeholder(str)  # default <workdir>/checkpoints; gs://, s3://, az://
    # Every 2nd evaluation: a reference, so it follows --config.train.eval_every (keep-best needs
    # saves on evaluation steps); override with an int, 0 = only time-based and final saves.
    ckpt.every_steps = train.get_ref("eval_every") * 2
    ckpt.every_minutes = 10.0
    ckpt.keep = 3  # the last N complete steps are kept ...
    ckpt.keep_best = True  # ... plus the best by validation RMSE (every_steps % eval_every == 0)
    ckpt.resume_from = config_dict.placeholder(str)
    # One run per workdir and store (docs/checkpoints.md): a record left by a run on another
    # host is taken over once its heartbeat is this old (a dead process on this host at once);
    # take_over=True takes over at once, for an operator who knows the other run is dead.
    ckpt.owner_timeout_s = 300.0
    ckpt.take_over = False

    # MLflow tracking (extra `pip install "pdm-jax[tracking]"`): with a URI (http(s)://host:port,
    # sqlite:///file.db, databricks), process 0 logs params, metrics, tags and the run's files
    # there too. Credentials come from MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN, never the URI.
    tracking = config.tracking = ml_collections.ConfigDict()
    tracking.mlflow_uri = config_dict.placeholder(str)  # unset: no tracking
    tracking.experiment = "pdm-jax"
    tracking.run_name = config_dict.placeholder(str)  # unset: the workdir's name
    return config
