"""A paced-train job's configuration: the flags and their sources.

The trainer's own settings are split by concern, each its own flag group: ``TrainConfig``
(steps, seed, precision, warm start), ``AlgorithmConfig``, ``BatchConfig``,
``SamplingConfig``, ``EvalConfig``, ``CheckpointConfig``, ``LoggingConfig``, ``DebugConfig``;
:class:`JobConfig` holds them with every other component's config. The flags keep their
Megatron-style names whatever group they sit in.

Every component has its own typed config dataclass (those above; ``TaskConfig``,
``ModelConfig``, ``ParallelConfig``, ``OptimizerConfig``, ``LogZConfig``, ``SelectionConfig``,
``ReplayConfig``, ``RolloutConfig`` beside their components); each becomes a group of
Megatron-style flags. :func:`parse_args` reads them, in rising order of precedence, from the
tiny built-in model, ``--model PRESET`` or ``--hf-config``, ``--config FILE.yaml`` and the
command line; :func:`megatron_paced.validation.validate_startup` checks them.

Usage::

    job = parse_args(["--config", "examples/demo.yaml", "--train-iters", "20"])
    job.train.train_iters, job.model.hidden_size      # typed: a JobConfig of dataclasses
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from megatron_paced.config import (
    ConfigError,
    FlagParser,
    OptimizerConfig,
    ParallelConfig,
    add_flags,
    flag,
    from_args,
    require,
)
from megatron_paced.data import DataConfig
from megatron_paced.models.config import PRESETS, ModelConfig, resolve_model_config
from megatron_paced.paced.log_z import LogZConfig
from megatron_paced.paced.replay import ReplayConfig
from megatron_paced.paced.selection import SelectionConfig
from megatron_paced.rollout import RolloutConfig
from megatron_paced.rollout.engine import SamplingParams
from megatron_paced.tasks import TaskConfig
from megatron_paced.tasks.arithmetic import CharTokenizer

PROGRAM = ("paced-train: RL post-training with PACED-RL (or GRPO / FlowRL) on "
           "Megatron-Core.")


@dataclass
class TrainConfig:
    """The RL job."""

    train_iters: int = 100
    """RL steps (0: only the SFT warm start, written to --save as a model-only checkpoint that
    --load starts RL runs from, the common base policy of a comparison)."""
    seed: int = 1234
    """Seed of weights, selection, sampling and data."""
    deterministic_mode: bool = False
    """As Megatron's --deterministic-mode: torch's deterministic algorithms (with
    CUBLAS_WORKSPACE_CONFIG, NCCL's ring algorithm and TE's deterministic attention), so that
    a GPU run and its resumption repeat bit for bit; slower. CPU runs are deterministic
    without it."""
    bf16: bool = False
    """bf16 mixed precision, as Megatron's --bf16: bf16 weights and activations, fp32 gradients
    and fp32 main weights in the optimizer (what GPUs train with; fp32 without it)."""
    sft_warmup_iters: int = 0
    """Supervised steps on the task's answers before RL (the base policy)."""
    sft_lr: float = 3e-3
    """Learning rate of the supervised warm start."""
    allow_random_init: bool = False
    """Run RL on a randomly initialized policy (no --load, no --sft-warmup-iters). Such a policy
    almost never earns a reward, so RL learns nothing; without this flag the run is refused."""

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


@dataclass
class AlgorithmConfig:
    """The loss and its coefficients."""

    algo: Literal["paced", "grpo", "flowrl"] = "paced"
    """Loss: paced (TB against pi_old + log-Z), grpo, or flowrl (TB against pi_ref)."""
    beta: float = 0.05
    """KL coefficient; rewards enter the TB losses as r / beta."""
    grpo_kl_coef: float = 0.0
    """GRPO's k3 KL coefficient to the reference (0: no reference model)."""
    flowrl_log_z: Literal["proj-z", "table"] = "proj-z"
    """FlowRL's log Z: proj-z (its recipe: an MLP on the mean of the policy's final hidden
    states over the prompt, trained with the policy) or table (the per-prompt log-Z table)."""
    flowrl_proj_z_layers: int = 3
    """FlowRL's ProjZ: linear layers (the recipe: 3, width the model's hidden size)."""
    flowrl_proj_z_dropout: float = 0.0
    """FlowRL's ProjZ: dropout (the recipe: 0.1; 0 keeps resume exact and layouts equal)."""
    flowrl_reward: Literal["advantage", "reward"] = "advantage"
    """FlowRL's log-reward: the scale times the group-normalized reward (advantage, the
    recipe) or times the reward itself."""
    flowrl_reward_scale: float = 15.0
    """FlowRL's reward coefficient (the recipe: 15)."""
    flowrl_weight_max: float = 10.0
    """FlowRL's importance weight exp(S_theta - S_old) is clipped above at this (the recipe:
    10)."""
    old_log_probs: Literal["recompute", "engine"] = "recompute"
    """The anchor S_old of the fresh samples: recompute (pi_old, the trainer's policy before
    this step's update, by a forward pass) or engine (the generating weights' log-probs from
    the rollout backend: pi_old itself when synchronous, the weights K steps older with
    --max-staleness K). Their gap is logged as old_logprob_drift_* (docs/results.md)."""

    @property
    def anchor_from_engine(self) -> bool:
        return self.old_log_probs == "engine"


@dataclass
class BatchConfig:
    """What one step trains on."""

    num_samples_per_prompt: int = 8
    """G: completions per selected prompt."""
    num_prompts_per_step: int = 16
    """Prompts selected per step (over all DP ranks)."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass on one rank."""
    num_steps_per_rollout: int = 1
    """Optimizer steps per rollout batch (slime's --num-steps-per-rollout, PPO's mini-batches):
    the step's groups (and replayed rows) split into this many mini-batches of whole groups,
    each one optimizer step (and one log-Z step of its prompts) against the same anchor
    pi_old. Each DP rank's prompts and replayed rows must divide by it."""
    global_batch_size: Optional[int] = None
    """Sequences per step; must equal prompts x samples + --replay-per-step if given."""
    dynamic_sampling: bool = False
    """DAPO-style dynamic sampling (a GRPO baseline): draw more rounds of prompts until the step
    has --num-prompts-per-step groups whose rewards differ; every completion generated counts
    in num_samples. Needs --prompt-selection uniform."""
    dynamic_sampling_max_rounds: int = 4
    """Most rounds of dynamic sampling per step (then groups with equal rewards fill in)."""


@dataclass
class SamplingConfig:
    """How rollouts are sampled."""

    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts."""
    max_new_tokens: int = 16
    """Longest completion."""

    def validate(self) -> None:
        SamplingParams(temperature=self.temperature, top_p=self.top_p,
                       max_new_tokens=self.max_new_tokens).validate()


@dataclass
class EvalConfig:
    """Held-out evaluation."""

    eval_interval: int = 0
    """Evaluate pass@1 / pass@k every this many steps (0: never)."""
    eval_num_prompts: int = 64
    """Held-out prompts per evaluation."""
    eval_k: int = 4
    """Samples per held-out prompt (pass@k)."""
    eval_train_accuracy: bool = False
    """Also log ``train_acc_exact``: the policy's exact mean accuracy over every training
    prompt (the oracle of --acc-estimator; arithmetic task, --temperature 1): what RL
    optimizes, without sampling noise."""
    eval_train_interval: int = 0
    """With --eval-train-accuracy: every this many steps log ``train_acc_exact`` alone (one
    forward pass over the training prompts, no sampling), between the held-out evaluations
    of --eval-interval (0: only with those)."""
    eval_final_k: int = 0
    """Samples per held-out prompt at the run's last evaluation (pass@k up to it; 0: --eval-k),
    so that pass@16 costs 16 samples once, not at every evaluation."""
    calibration_interval: int = 0
    """Every this many steps, probe beta * log_z against the Monte-Carlo accuracy of training
    prompts (megatron_paced.rl.calibration; 0: never). Probe samples are not trained on and
    not counted in num_samples."""
    calibration_prompts: int = 16
    """Prompts per probe group (visited and never-visited), drawn uniformly."""
    calibration_samples: int = 32
    """Completions per probed prompt (M)."""

    def validate(self) -> None:
        for name in ("eval_interval", "eval_train_interval", "eval_final_k",
                     "calibration_interval"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        if self.eval_interval:
            for name in ("eval_num_prompts", "eval_k"):
                require(getattr(self, name) >= 1, name, getattr(self, name),
                        "must be >= 1 when --eval-interval is set")


@dataclass
class CheckpointConfig:
    """Where checkpoints and metrics go, and where a run resumes from."""

    save: Optional[str] = None
    """Folder of checkpoints and metrics.jsonl."""
    load: Optional[str] = None
    """Checkpoint folder to start or resume from (the latest iteration in it: a converted model
    or a run's --save). A folder without a checkpoint is an error, unless it is also --save
    (a requeued job's pattern: it then starts fresh until something is saved)."""
    save_interval: int = 0
    """Save every this many steps (0: only at the end, if --save)."""

    def load_is_save(self) -> bool:
        """--load and --save name one folder (resume where a requeued job left off)."""
        return bool(self.load and self.save) and \
            os.path.realpath(self.load) == os.path.realpath(self.save)

    def validate(self) -> None:
        require(self.save_interval >= 0, "save_interval", self.save_interval,
                "must be >= 0 (0: only at the end)")
        for name in ("save", "load"):
            path = getattr(self, name)
            require(path is None or not os.path.exists(path) or os.path.isdir(path), name, path,
                    "names a file, not a folder")
        require(self.save is None or os.access(_existing_parent(self.save), os.W_OK), "save",
                self.save, "is in a folder this process cannot write")


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


@dataclass
class LoggingConfig:
    """What is logged beyond metrics.jsonl."""

    kl_interval: int = 10
    """Every this many steps, log beta_kl_old_new = beta * KL(pi_old || pi_theta) after the
    update, on fresh samples of pi_old that the update did not use (a group per prompt of
    the step, generated before it, not counted in num_samples; 0: never)."""
    grad_noise_scale_interval: int = 10
    """Every this many steps, log grad_noise_scale: McCandlish's B_simple = tr(Sigma) / |G|^2
    of the loss's gradient, in the loss's items (sequences; GRPO: tokens), over the steps
    since the last log, with its standard error (grad_noise_scale_se) and the batch it
    compares with (grad_batch_items). The small batch is each DP rank's share, or with one
    DP rank the first micro-batch of the step's rows in a seeded random order (not logged
    with one DP rank and a pipeline, or with one micro-batch). 0: never (and no shuffle)."""
    log_prompt_accuracy: bool = False
    """Also log each step's per-prompt acc_est (beta * log_z) and observed group accuracy
    (for calibration plots)."""
    wandb_project: Optional[str] = None
    """Also log to this wandb project (offline without network)."""


@dataclass
class DebugConfig:
    """Testing aids and fault injection."""

    exit_after_step: Optional[int] = None
    """Testing aid: exit with code 17 right after this step, as if killed."""
    inject_nan_at_step: Optional[int] = None
    """Fault injection: one reward in this step's loss becomes NaN (the run must stop)."""
    kill_rollout_server_after_step: Optional[int] = None
    """Fault injection: right after this step, kill the first rollout server this process
    launched (SIGKILL; the client must restart it and lose nothing)."""


TINY_MODEL = PRESETS["tiny"]  # the flags' defaults (the vocabulary: the arithmetic task's)


@dataclass
class JobConfig:
    """Every component's config of one paced-train job; each is a group of flags."""

    train: TrainConfig
    algorithm: AlgorithmConfig
    batch: BatchConfig
    sampling: SamplingConfig
    eval: EvalConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    debug: DebugConfig
    task: TaskConfig
    data: DataConfig
    parallel: ParallelConfig
    model: ModelConfig
    optimizer: OptimizerConfig
    log_z: LogZConfig
    selection: SelectionConfig
    replay: ReplayConfig
    rollout: RolloutConfig


# Flag groups, in --help's order: the JobConfig field each fills and its dataclass.
CONFIGS = {"train": TrainConfig, "algorithm": AlgorithmConfig, "batch": BatchConfig,
           "sampling": SamplingConfig, "eval": EvalConfig, "checkpoint": CheckpointConfig,
           "logging": LoggingConfig, "debug": DebugConfig, "task": TaskConfig, "data": DataConfig,
           "parallel": ParallelConfig, "model": ModelConfig,
           "optimizer": OptimizerConfig, "log_z": LogZConfig, "selection": SelectionConfig,
           "replay": ReplayConfig, "rollout": RolloutConfig}


def read_yaml_flags(parser: argparse.ArgumentParser, path: str) -> dict:
    """``--config FILE.yaml`` -> flag values, each through its flag's type and choices (what
    the command line would check); any problem is a ``parser.error`` naming the file and key."""
    import yaml

    try:
        with open(path) as f:
            loaded = yaml.safe_load(f)
    except OSError as err:
        parser.error(f"--config {path}: {err.strerror}")
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        parser.error(f"--config {path}:{line} not valid YAML ({getattr(err, 'problem', err)})")
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        parser.error(f"--config {path}: must be a mapping of flag names to values, not a "
                     f"{type(loaded).__name__}")
    actions = {action.dest: action for action in parser._actions
               if action.dest not in ("help", "config")}
    unknown = sorted(str(k) for k in loaded if str(k).replace("-", "_") not in actions)
    if unknown:
        parser.error(f"--config {path}: unknown keys {unknown}")
    values = {}
    for raw_key, value in loaded.items():
        key = str(raw_key).replace("-", "_")
        action = actions[key]
        if value is None:
            continue
        name = f"--config {path}: {raw_key}"
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                parser.error(f"{name}: {value!r} must be true or false")
            values[key] = value
            continue
        items = value if isinstance(value, list) else [value]
        if action.nargs != "+" and isinstance(value, list) or not items or any(
                isinstance(item, (dict, list)) for item in items):
            parser.error(f"{name}: {value!r} is not a value of {action.option_strings[0]}")
        converted = []
        for item in items:
            if isinstance(item, bool) and action.type is not bool:
                parser.error(f"{name}: {item!r} is not a value of {action.option_strings[0]}")
            try:
                item = (action.type or str)(str(item))
            except (TypeError, ValueError):
                parser.error(f"{name}: {item!r} is not a valid "
                             f"{getattr(action.type, '__name__', 'value')}")
            if action.choices is not None and item not in action.choices:
                parser.error(f"{name}: {item!r} is not one of {list(action.choices)}")
            converted.append(item)
        values[key] = converted if action.nargs == "+" else converted[0]
    return values


TINY_MODEL_DEFAULTS = {"lr": 1e-3, "weight_decay": 0.0, "replay_per_step": 0}
"""Where the built-in tiny model (no --model, no --hf-config) departs from the paper's
settings, which a real model keeps: it learns its 1-2 digit sums in minutes only at these."""


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, its defaults set as a run with ``argv`` uses them: in rising order, the
    dataclasses' (the paper's settings), the tiny built-in model's shape and
    :data:`TINY_MODEL_DEFAULTS` unless ``--model PRESET`` or ``--hf-config config.json`` gives
    a real model's shape, then ``--config FILE.yaml`` (unknown keys are an error). ``--help``
    prints these, so ``paced-train --model qwen2.5-7b --help`` shows the 7B run's."""

    parser = FlagParser(prog="paced-train", description=PROGRAM)
    parser.add_argument("--config", help="YAML file of flag values (flag names, - or _)")
    parser.add_argument("--model", help="model preset whose shape sets the model flags' "
                        "defaults (see megatron_paced.models.config.PRESETS)")
    parser.add_argument("--hf-config", help="Hugging Face config.json (or its folder) whose "
                        "shape sets the model flags' defaults")
    for title, cls in CONFIGS.items():
        add_flags(parser, cls, title)
    selection = next(a for a in parser._actions if a.dest == "prompt_selection")
    selection.help = selection.help.replace(
        "(default: %(default)s)", "(default: paced-greedy where the run trains a log-Z table, "
        "--algo paced or flowrl with --flowrl-log-z table; uniform otherwise)")
    pre_argv = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in
                ("-h", "--help")]
    pre, _ = parser.parse_known_args(pre_argv)
    values: dict = {}
    if pre.config:
        values = read_yaml_flags(parser, pre.config)
    model, hf_config = pre.model or values.get("model"), pre.hf_config or values.get("hf_config")
    if model or hf_config:
        try:
            parser.set_defaults(**vars(resolve_model_config(model, hf_config)))
        except (ConfigError, OSError, ValueError) as err:
            parser.error(str(err))
    else:
        parser.set_defaults(**vars(TINY_MODEL.replace(vocab_size=CharTokenizer().vocab_size)),
                            **TINY_MODEL_DEFAULTS)
    replay = {}
    if model or hf_config:  # a real model: PACED-RL replays (the tiny one trains without)
        action = next(a for a in parser._actions if a.dest == "replay_per_step")
        action.help = action.help.replace(
            "(default: %(default)s)", f"(default: {PACED_REPLAY_PER_STEP} with --algo paced, "
            "0 otherwise; 0 is PACED-RL's no-replay ablation)")
        replay = {"replay_per_step": None}
    parser.set_defaults(prompt_selection=None, **replay)  # None: follows --algo
    parser.base_defaults = {a.dest: a.default for a in parser._actions}  # before the YAML
    parser.set_defaults(**values)
    return parser


def parse_args(argv: list[str] | None = None) -> JobConfig:
    """The run's configuration from its flags (defaults: :func:`build_parser`)."""
    args = build_parser(argv).parse_args(argv)
    for name, value in algorithm_defaults(args.algo, args.flowrl_log_z).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return JobConfig(**{title: from_args(cls, args) for title, cls in CONFIGS.items()})


PACED_REPLAY_PER_STEP = 16
"""PACED-RL's replay by default: 16 samples a step from a buffer of 128 (--replay-size), the
setting docs/results.md measured (at 4 prompts x 8 samples a step it halves the samples
to half of GRPO's gain against no replay; the paper's 64 into 128 is not measured here)."""


def algorithm_defaults(algo: str, flowrl_log_z: str) -> dict:
    """The defaults that follow --algo, where the parser leaves None: PACED-RL replays (GRPO
    and FlowRL train on fresh samples); runs that train a log-Z table select by it (GRPO and
    FlowRL's head train none)."""
    return {"replay_per_step": PACED_REPLAY_PER_STEP if algo == "paced" else 0,
            "prompt_selection": "paced-greedy" if trains_log_z_table(algo, flowrl_log_z)
            else "uniform"}


def flag_values(job: JobConfig) -> dict:
    """Every flag of the run and its value (field name -> value), in --help's order."""
    return {f.name: getattr(getattr(job, title), f.name) for title, cls in CONFIGS.items()
            for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


def changed_flags(job: JobConfig, argv: list[str] | None = None) -> dict:
    """The flags whose values differ from the defaults a run with ``argv``'s model would
    use (the YAML file and the command line counted as changes)."""
    defaults = dict(build_parser(argv).base_defaults)
    derived = algorithm_defaults(job.algorithm.algo, job.algorithm.flowrl_log_z)
    defaults.update({name: value for name, value in derived.items()
                     if defaults.get(name) is None})
    return {name: value for name, value in flag_values(job).items()
            if _plain(value) != _plain(defaults.get(name))}


def as_command_line(values: dict) -> str:
    """Flag values (field name -> value) as the command line that sets them."""
    words = []
    for name, value in values.items():
        option = flag(name)
        if isinstance(value, bool):
            words.append(option if value else "--no-" + option[2:])
        elif isinstance(value, (list, tuple)):
            words.append(" ".join([option, *map(str, value)]))
        else:
            words.append(f"{option} {value}")
    return " ".join(words)


def config_yaml(job: JobConfig) -> str:
    """The run's resolved configuration as a YAML file of every flag that ``--config``
    reads back to the same job (unset flags and secrets, ``*api_key*``, left out)."""
    import yaml

    values = {name: _plain(value) for name, value in flag_values(job).items()
              if value is not None and value != [] and value != () and "api_key" not in name}
    return ("# paced-train's resolved configuration: paced-train --config THIS_FILE repeats "
            "the run\n" + yaml.safe_dump(values, sort_keys=False))


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def trains_log_z_table(algo: str, flowrl_log_z: str = "table") -> bool:
    """Whether ``--algo`` trains the per-prompt log-Z table (PACED-RL; FlowRL unless its log Z
    is its ProjZ head)."""
    return algo == "paced" or (algo == "flowrl" and flowrl_log_z == "table")
