"""Training a makemore model on a word list: the loop behind ``fastlm train`` and ``fastlm sample``.

One ``TrainConfig`` says everything about a run and is stored in every checkpoint. Batches come from a
seeded generator whose state is checkpointed with the model and optimizer, and every fastlm kernel is
deterministic, so a run interrupted (Ctrl-C writes a checkpoint) and resumed with ``--resume`` ends with
the same parameters, bit for bit, as one that was never interrupted. Checkpoints are written to a temporary
file and renamed, so a crash mid-write never leaves a broken one. Under ``torchrun`` the run is data
parallel: each rank trains on its slice of a batch of ``world_size * batch_size`` rows drawn by the same
generator, BatchNorm is synchronised across ranks, and rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fastlm import backends, data, models
from fastlm.cuda_graph import CapturedStep
from fastlm.dtype_names import DTYPES

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


@dataclasses.dataclass
class TrainConfig:
    # None: the model's lecture recipe (fastlm.models: mlp-bn is 200k steps of batch 32, SGD, lr 0.1 then 0.01
    # after half; the neural bigram 100 full-batch steps at lr 50). batch_size 0: the whole training split.
    model: str = models.DEFAULT_MODEL
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    lr_after: float | None = None  # the learning rate from decay_at (a fraction of the steps) on
    decay_at: float | None = None
    optimizer: str | None = None
    context: int | None = None
    embedding: int | None = None
    hidden: int | None = None
    backend: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 42
    data: str | None = None
    extend_vocab: bool = False
    eval_every: int = 10_000
    checkpoint_every: int = 10_000
    samples: int = 20
    compare: bool = False
    cuda_graph: bool = False  # capture the fused model's step in a CUDA graph (one GPU, plain SGD)
    out: str = "runs/fastlm"

    def learning_rate(self, step: int) -> float:
        return self.lr if step < self.decay_at * self.steps else self.lr_after

    def with_recipe(self, recipe: models.Recipe) -> "TrainConfig":
        """Unset schedule options filled from a model's lecture recipe."""
        decays = recipe.decay_at is not None and recipe.steps
        lr = recipe.lr if self.lr is None else self.lr
        return dataclasses.replace(
            self,
            steps=recipe.steps if self.steps is None else self.steps,
            batch_size=(recipe.batch_size or 0) if self.batch_size is None else self.batch_size,
            optimizer=self.optimizer or recipe.optimizer,
            lr=lr,  # and after the drop, the recipe's factor of it (of a given --lr too: 0.001 rose to 0.01)
            lr_after=(lr * recipe.decay if decays else lr) if self.lr_after is None else self.lr_after,
            decay_at=(recipe.decay_at / recipe.steps if decays else 1.0) if self.decay_at is None else self.decay_at)


class ConfigError(ValueError):
    """Options that cannot work together, or a run's files that cannot be read or written, with a message meant
    for the user."""


SEEDS = (-0x8000_0000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF)  # the seeds torch.manual_seed takes


def first_line(error: BaseException) -> str:
    """An error's message cut to its first line for a one-line report (its type's name when it has none)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


OUTPUT_FILES = ("checkpoint.pt", "summary.json", "loss.png")
INT64_MAX = 2**63 - 1


def json_numbers(summary: dict) -> dict:
    """The summary with each non-finite float (a diverged run's losses) as None, which JSON writes as null."""
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in summary.items()}


def check_seed(seed: int) -> None:
    if not SEEDS[0] <= seed <= SEEDS[1]:
        raise ConfigError(f"--seed must be a 64-bit integer (from {SEEDS[0]} to {SEEDS[1]}), got {seed}")


def check_options(config: TrainConfig) -> None:
    """ConfigError for option values no run can use (before any data is read or model built)."""
    for name, least in (("steps", 0), ("batch_size", 0), ("eval_every", 1), ("checkpoint_every", 1),
                        ("context", 1), ("embedding", 1), ("hidden", 1), ("samples", 0), ("lr", 0.0),
                        ("lr_after", 0.0), ("decay_at", 0.0)):
        value = getattr(config, name)
        if value is not None and not value >= least:  # NaN fails too
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
        if isinstance(value, int) and value > INT64_MAX:  # (torch's sizes are int64)
            raise ConfigError(f"--{name.replace('_', '-')} must be at most {INT64_MAX}, got {value}")
    for name in ("lr", "lr_after"):
        if getattr(config, name) is not None and not math.isfinite(getattr(config, name)):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(config, name)}")
    if config.decay_at is not None and config.decay_at > 1:
        raise ConfigError(f"--decay-at is a fraction of the steps, at most 1, got {config.decay_at}")
    check_seed(config.seed)
    try:
        device = torch.device(config.device)
    except RuntimeError as error:
        raise ConfigError(f"--device {config.device}: {error}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {config.device}: fastlm runs on the CPU (cpu) or a CUDA GPU (cuda, cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {config.device}: this machine's torch sees no CUDA GPU")
    if config.backend is not None:
        try:
            backends.resolve(device, config.backend)
        except (RuntimeError, ValueError) as error:  # an unknown backend, or one this machine lacks
            raise ConfigError(str(error)) from None


@dataclasses.dataclass
class Dataset:
    vocab: data.Vocabulary
    splits: dict  # name -> (X, Y)
    words: dict  # the word list's count and digest, kept in checkpoints


def load_dataset(config: TrainConfig, device: torch.device, resuming: bool = False) -> Dataset:
    try:
        words, vocab = data.load_words(config.data, None if config.extend_vocab else data.Vocabulary())
    except data.OutsideVocabulary as error:
        hint = ("the checkpoint's vocabulary lacks them: resume with that run's word list" if resuming
                else "use --extend-vocab to add them")
        raise data.DataError(f"{error}; {hint}") from None
    parts = dict(zip(("train", "val", "test"), data.split_words(words, config.seed)))
    empty = [name for name, part in parts.items() if not part]  # checked before any window is built
    if empty:
        count = f"{len(words)} word{'' if len(words) == 1 else 's'}"
        raise data.DataError(f"the word list ({count}) is too short: the {' and '.join(empty)} "
                             f"split{'s are' if len(empty) > 1 else ' is'} empty (the split is 80/10/10: it takes at "
                             "least 6 words)")
    context = context_of(config)
    splits = {name: tuple(t.to(device) for t in data.build_windows(part, context, vocab))
              for name, part in parts.items()}
    return Dataset(vocab, splits, {"count": len(words), "sha256": data.words_digest(words)})


def context_of(config: TrainConfig) -> int:
    return models.default_context(config.model) if config.context is None else config.context


def build_model(config: TrainConfig, vocab_size: int, fused: bool, device: torch.device) -> nn.Module:
    torch.manual_seed(config.seed)  # both twins start from the same initialisation
    try:
        model = models.build(config.model, fused=fused, context=config.context, vocab_size=vocab_size,
                             embedding=config.embedding, hidden=config.hidden,
                             backend=config.backend if fused else None)
    except ValueError as error:  # a size the model does not have, an unknown model
        raise ConfigError(str(error)) from None
    return model.to(device=device, dtype=DTYPES[config.dtype])


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer | None:
    if config.optimizer is None:  # a model fit by counting
        return None
    return OPTIMIZERS[config.optimizer](model.parameters(), lr=config.lr)


def is_plain_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """SGD without momentum, weight decay or maximize: its step is p -= lr * grad and it keeps no state."""
    return type(optimizer) is torch.optim.SGD and all(
        group["momentum"] == 0 and group["weight_decay"] == 0 and not group["maximize"]
        for group in optimizer.param_groups)


def check_cuda_graph(config: TrainConfig, device: torch.device, world: int, optimizer) -> None:
    """ConfigError unless the run can capture its step in a CUDA graph (fastlm.cuda_graph)."""
    if device.type != "cuda":
        raise ConfigError(f"--cuda-graph captures the training step on a GPU: it needs --device cuda, got {device}")
    if world > 1:
        raise ConfigError("--cuda-graph runs in one process: it does not combine with torchrun")
    if optimizer is None or not is_plain_sgd(optimizer):
        raise ConfigError(f"--cuda-graph captures plain SGD steps; the {config.model} model trains with "
                          f"{config.optimizer or 'counting, no steps'}")


class LossOf(nn.Module):
    """model.loss as a forward, so that DDP (which hooks forward) can wrap it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        return self.model.loss(idx, targets)


@torch.no_grad()
def split_loss(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, batch: int = 65536) -> float:
    """The mean loss over a whole split, in eval mode (BatchNorm on its running statistics)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(X), batch):
        total += model.loss(X[i:i + batch], Y[i:i + batch]).item() * len(X[i:i + batch])
    model.train(was_training)
    return total / max(1, len(X))


@torch.no_grad()
def sample_words(model: nn.Module, vocab: data.Vocabulary, context: int, count: int, seed: int,
                 max_length: int = 50):
    """Yields ``count`` words drawn from the model, one at a time (the sampler seeded with ``seed``); ConfigError
    if the model's probabilities are not finite numbers (its training diverged)."""
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(count):
        window, out = [0] * context, []
        for _ in range(max_length):
            logits = model(torch.tensor([window], device=device))
            probs = torch.softmax(logits.float(), dim=1).cpu()
            if not torch.isfinite(probs).all():
                raise ConfigError("the model's outputs are not finite numbers (its training diverged): it has no "
                                  "names to sample")
            i = int(torch.multinomial(probs, 1, generator=generator))
            if i == 0:
                break
            out.append(i)
            window = window[1:] + [i]
        yield vocab.decode(out)


def save_atomically(state: dict, path: Path) -> None:
    """Writes ``state`` to a temporary file renamed to ``path``: a failed write (a full disk) leaves the previous
    file whole, and no temporary file behind."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a short write as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {str(path)!r}: {first_line(error)}") from None


def checkpoint_state(config, dataset, model, optimizer, step, generator_state, history, reference=None,
                     reference_optimizer=None, world: int = 1) -> dict:
    """Everything a run resumes from; with ``reference``, also the plain-PyTorch twin of a --compare run. ``world``:
    the number of processes it trained in (its batch is ``world`` times config's batch_size)."""
    unwrapped = model.module if hasattr(model, "module") else model
    state = {"config": dataclasses.asdict(config), "world": world, "vocab": dataset.vocab.chars,
             "words": dataset.words,
             "model": unwrapped.state_dict(),
             "optimizer": optimizer.state_dict() if optimizer else None, "step": step,
             "generator": generator_state, "torch_rng": torch.get_rng_state(), "history": history}
    if reference is not None:
        state["reference"] = reference.state_dict()
        state["reference_optimizer"] = reference_optimizer.state_dict() if reference_optimizer else None
    return state


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch.load's errors for a truncated or foreign file vary: pickle, zip, EOF
        raise ConfigError(f"{str(path)!r} is not a readable checkpoint (truncated, corrupt or not a torch.save "
                          f"file): {first_line(error)}") from None
    missing = {"config", "vocab", "model", "step"} - set(state if isinstance(state, dict) else ())
    if missing:
        raise ConfigError(f"{str(path)!r} is not a fastlm checkpoint (it lacks {', '.join(sorted(missing))})")
    return state


def saved_config(state: dict) -> TrainConfig:
    """The configuration a checkpoint was trained with."""
    try:
        return TrainConfig(**state["config"])
    except TypeError as error:  # options this fastlm does not have: another version's checkpoint
        raise ConfigError(f"the checkpoint's configuration is not this fastlm version's: {error}") from None


def resumed_config(saved: TrainConfig, steps: int | None, step: int, out: str) -> TrainConfig:
    """What a run resumed at ``step`` continues with: its checkpoint's configuration, with ``out`` and, where given,
    ``steps`` from the caller. With more or fewer steps, the learning rate still drops at the step it did."""
    if steps is None or steps == saved.steps:
        return dataclasses.replace(saved, out=out)
    if steps < step:
        raise ConfigError(f"--steps {steps}: the checkpoint is at step {step}, past the end asked for")
    first_low_step = math.ceil(saved.decay_at * saved.steps)  # the first step at lr_after
    # The drop half a step before it, so that rounding the fraction times the steps cannot move it by a step.
    decay_at = min(1.0, max(0.0, (first_low_step - 0.5) / steps)) if steps else 1.0
    return dataclasses.replace(saved, steps=steps, out=out, decay_at=decay_at)


def load_model_state(model: nn.Module, state_dict: dict) -> None:
    """``model.load_state_dict(state_dict)``, refusing a checkpoint of another model or size in one line."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        first_lines = " ".join(str(error).splitlines()[:2])
        raise ConfigError(f"the checkpoint's weights do not fit its model: {first_lines}") from None


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; torchrun's agent passing a Ctrl-C on, or a scheduler


class StoppedBySignal(KeyboardInterrupt):
    """Training stopped between steps by SIGINT or SIGTERM (``signum``), its checkpoint written; the CLI exits
    with 128 + signum, as a process killed by that signal would (130 for Ctrl-C, 143 for a scheduler's SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def interrupts_between_steps():
    """Within the block, SIGINT and SIGTERM only note their number (read by calling the yielded function: the
    highest one received, so SIGTERM over SIGINT as across ranks; 0 for none), so a step is never cut in half;
    outside the main thread, where no handler can be set, they are left as they are."""
    received = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in STOP_SIGNALS}
    try:
        yield lambda: max(received, default=0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def distributed_rank(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device), initialising the process group when launched by torchrun: NCCL
    for a run on GPUs, each process on the GPU of its LOCAL_RANK, made the current one before NCCL starts (as
    torch's recipe has it: NCCL's own calls use the current device); gloo for one on the CPU (on a machine with
    GPUs too)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # torch._dynamo, imported for the first time after the group exists (torch.optim imports it when the first
        # optimizer is made), keeps references to the group that destroy_process_group leaves: the group's gloo
        # threads then live on to interpreter exit, where a rank sometimes aborts ("terminate called without an
        # active exception", SIGABRT; 3 runs in 20 that stopped on a bad --out). Imported before, it keeps none.
        from torch import _dynamo  # noqa: F401  (not "import torch._dynamo": that makes torch a local name here)

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def leave_process_group() -> None:
    """Ends this process's part in the process group of a torchrun run, when there is one, joining gloo's threads
    (see distributed_rank): a process that exits with its group alive (after an error every rank raised, or
    training) could abort in gloo's teardown ("terminate called without an active exception", SIGABRT).

    A DistributedDataParallel model must be gone before: in torch 2.13 a collective launched from a backward pass
    holds a Python object that a gloo thread frees under the GIL, and a group whose last reference is the model's
    dies with the model, holding the GIL while it joins that thread: a deadlock, if the thread is not done yet. The
    group's own Python object lets the GIL go as it dies."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Trainer:
    """One training run: model (and with ``compare`` its plain-PyTorch twin), optimizer, batches, logs."""

    def __init__(self, config: TrainConfig, resume: bool = False, log=print, given: set[str] | None = None):
        """``given``: the names of the options the user gave (the CLI knows them); without it, those away from
        their defaults are taken as given. Under torchrun rank 0 alone logs (and writes files)."""
        self.log = log if int(os.environ.get("RANK", "0")) == 0 else (lambda *args, **kwargs: None)
        # A resumed run is built from its checkpoint's configuration (only steps and out come from the caller, and
        # the word list where the checkpoint records its words, to find a list that has moved: the words are
        # checked against that record below), so that the model, device and the checks on them are those of the
        # run it continues.
        checkpoint = None
        for name in ("out", "data"):  # "" would be taken as the current directory
            if getattr(config, name) == "":
                raise ConfigError(f"--{name}: an empty path")
        if config.data is not None:  # a run resumed from another folder still finds its words
            config = dataclasses.replace(config, data=os.path.abspath(config.data))
        if resume:
            checkpoint = load_checkpoint(config.out)
            saved = saved_config(checkpoint)
            if config.data is not None and checkpoint.get("words") is not None:
                saved = dataclasses.replace(saved, data=config.data)
            self._note_ignored_options(config, saved, given)
            config = resumed_config(saved, config.steps, checkpoint["step"], config.out)
            if config.compare and "reference" not in checkpoint:
                raise ConfigError("this --compare run's checkpoint has no reference twin to continue")
        check_options(config)
        requested = config
        if config.compare and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("--compare trains the plain-PyTorch twin in one process: it does not combine with "
                              "torchrun (compare one process at the global batch size instead)")
        self.config = config
        self.rank, self.world, self.device = distributed_rank(torch.device(config.device))
        self.out = Path(config.out)
        self.dataset = load_dataset(config, self.device, resuming=checkpoint is not None)
        saved_words = checkpoint.get("words") if checkpoint is not None else None  # (older checkpoints lack it)
        if saved_words is not None and saved_words != self.dataset.words:
            which = repr(str(config.data)) if config.data else "(the bundled names)"
            raise ConfigError(f"the word list {which} is not the one the checkpoint was trained on (it has "
                              f"{self.dataset.words['count']} words, that one had {saved_words['count']}; or they "
                              "differ in content or order): its shuffle and split would differ; resume with that "
                              "run's word list")
        if checkpoint is not None and self.dataset.vocab.chars != checkpoint["vocab"]:
            raise ConfigError(f"the word list's characters ({self.dataset.vocab.chars[1:]!r}) are not those the "
                              f"checkpoint was trained on ({checkpoint['vocab'][1:]!r}): resume with that run's word "
                              "list")
        vocab_size = self.dataset.vocab.size
        self.model = build_model(config, vocab_size, fused=True, device=self.device)
        self.config = config = config.with_recipe(self.model.recipe)
        if checkpoint is not None:
            self.config = config = self._same_global_batch(config, checkpoint.get("world", 1))
        if hasattr(self.model, "fit") and config.optimizer is not None:
            raise ConfigError(f"the {config.model} model is fit by counting: it takes no --optimizer")
        if hasattr(self.model, "fit") and checkpoint is None:
            self._note_unused_schedule(requested)
        batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        if config.batch_size * self.world == 1 and batch_norm:
            raise ConfigError(f"--batch-size 1: the {config.model} model's BatchNorm needs more than one row per batch "
                              "in training")
        self.reference = build_model(config, vocab_size, fused=False, device=self.device) if config.compare else None
        if self.reference is not None:
            self.model.load_state_dict(self.reference.state_dict())
        if self.world > 1:
            from fastlm.nn import SyncBatchNorm

            self.model = SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.optimizer = make_optimizer(config, self.model)
        if config.cuda_graph:
            check_cuda_graph(config, self.device, self.world, self.optimizer)
        self.captured_step = None  # the CUDA graph of the step, captured at the first step
        self.reference_optimizer = make_optimizer(config, self.reference) if self.reference is not None else None
        self.generator = torch.Generator().manual_seed(config.seed)
        self.draw_start, self.drawn, self.drawn_used = None, None, 0  # see _batch
        self.step = 0
        self.history = {"step_loss": [], "val": [], "reference_step_loss": []}
        self.saved_step = None  # the step of the last checkpoint written
        if checkpoint is not None:
            self._restore(checkpoint)
        problem = self._out_problem() if self.rank == 0 else None  # a bad --out is found now, not after training
        if self.world > 1:  # every rank stops on it, not rank 0 alone (the others would wait in a collective)
            flag = torch.tensor([problem is not None], dtype=torch.int32, device=self.device)
            dist.all_reduce(flag)
            problem = problem or (f"--out {config.out}: rank 0 cannot write there" if flag.item() else None)
        if problem:
            raise ConfigError(problem)
        if self.rank == 0 and checkpoint is None and (self.out / "checkpoint.pt").exists():
            self.log(f"note: this run replaces the checkpoint of an earlier run in {config.out} "
                     "(--resume continues that run)")
        # Under torchrun (where --compare is refused) the model's loss runs through DDP, which hooks a forward;
        # made last, so that no error of this constructor leaves one alive (see leave_process_group).
        self.ddp_loss = (nn.parallel.DistributedDataParallel(LossOf(self.model))
                         if self.world > 1 and self.optimizer is not None else None)

    def _out_problem(self) -> str | None:
        """Why the output directory cannot be made or written, or None."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            return f"--out {self.config.out}: cannot create the output directory ({error})"
        try:
            tempfile.TemporaryFile(dir=self.out).close()
        except OSError as error:
            return f"--out {self.config.out}: cannot write files there ({error})"
        for name in OUTPUT_FILES:
            if (self.out / name).exists() and not (self.out / name).is_file():
                return f"--out {self.config.out}: its {name} is not a file, which the run would replace"
        return None

    def _note_ignored_options(self, requested: TrainConfig, saved: TrainConfig, given: set[str] | None) -> None:
        """A resumed run keeps its checkpoint's configuration: says which options given now (besides --steps and
        --out) it ignores."""
        defaults = TrainConfig()
        ignored = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("steps", "out") and
                   (f.name in given if given is not None else getattr(requested, f.name) != getattr(defaults, f.name))
                   and getattr(requested, f.name) != getattr(saved, f.name)]
        if ignored:
            self.log("note: resuming with the checkpoint's configuration; ignored: " +
                     ", ".join(f"--{name.replace('_', '-')}" for name in ignored))

    def _same_global_batch(self, config: TrainConfig, saved_world: int) -> TrainConfig:
        """A run resumed in another number of processes keeps its batch of saved_world * batch_size rows (the
        same rows: they are drawn for the whole batch, then shared out), split over this run's processes."""
        rows = saved_world * config.batch_size
        if saved_world == self.world or rows == 0:  # (0: the whole split, shared out whatever the world)
            return config
        if rows % self.world:
            raise ConfigError(f"the checkpoint's run trained in {saved_world} processes of {config.batch_size} rows: "
                              f"its batch of {rows} rows does not split over {self.world}; resume in a number of "
                              f"processes that divides {rows}")
        self.log(f"note: the checkpoint's run trained in {saved_world} processes of {config.batch_size} rows; "
                 f"resumed in {self.world}, {rows // self.world} rows each, so the batch stays {rows} rows")
        return dataclasses.replace(config, batch_size=rows // self.world)

    def _note_unused_schedule(self, requested: TrainConfig) -> None:
        """A model fit by counting takes no gradient steps: says which schedule options given it ignores."""
        given = [name for name in ("steps", "batch_size", "lr", "lr_after", "decay_at")
                 if getattr(requested, name) is not None]
        if given:
            self.log(f"note: the {requested.model} model is fit by counting, in one pass over the training split; "
                     "ignored: " + ", ".join(f"--{name.replace('_', '-')}" for name in given))

    def _restore(self, state: dict) -> None:
        load_model_state(self.model, state["model"])
        if self.optimizer and state["optimizer"]:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.reference is not None:
            self.reference.load_state_dict(state["reference"])
            if self.reference_optimizer and state["reference_optimizer"]:
                self.reference_optimizer.load_state_dict(state["reference_optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.history = state["step"], state["history"]

    def save(self) -> None:
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_atomically(checkpoint_state(self.config, self.dataset, self.model, self.optimizer, self.step,
                                             self._generator_state(), self.history, self.reference,
                                             self.reference_optimizer, self.world), self.out / "checkpoint.pt")
        self.saved_step = self.step

    # Rows of batch indices drawn and gathered at once: one randint and one index_select per array for many steps
    # instead of per step. The draws come out of the generator in the same order either way, so the batches (and
    # losses) are those of per-step draws. 50k default steps: 10.8-11.2 s to 9.8-10.5 s wall (alternating runs).
    DRAW_ROWS = 8192

    def _batch(self):
        X, Y = self.dataset.splits["train"]
        B = self.config.batch_size
        if B == 0:  # the whole split, each rank its own share
            return X[self.rank::self.world], Y[self.rank::self.world]
        if self.drawn is None or self.drawn_used * B == len(self.drawn[1]):
            self.draw_start = self.generator.get_state()
            steps = max(1, self.DRAW_ROWS // (self.world * B))
            ix = torch.randint(0, len(X), (steps, self.world * B), generator=self.generator)
            ix = ix[:, self.rank * B:(self.rank + 1) * B].reshape(-1).to(X.device)
            self.drawn = X.index_select(0, ix), Y.index_select(0, ix)
            self.drawn_used = 0
        rows = slice(self.drawn_used * B, (self.drawn_used + 1) * B)
        self.drawn_used += 1
        return self.drawn[0][rows], self.drawn[1][rows]

    def _generator_state(self) -> torch.Tensor:
        """The batch generator's state as of the next step: the draws made ahead for steps not yet taken are
        replayed from the state before them, so that a resumed run draws the batches this one would have."""
        if self.draw_start is None:
            return self.generator.get_state()
        replay = torch.Generator().set_state(self.draw_start)
        torch.randint(0, len(self.dataset.splits["train"][0]), (self.drawn_used * self.world * self.config.batch_size,),
                      generator=replay)
        return replay.get_state()

    def _train_step(self, model, optimizer, xb, yb, lr) -> float:
        if model is self.model and self.config.cuda_graph:
            if self.captured_step is None:
                self.captured_step = CapturedStep(model, xb, yb)
            return self.captured_step(xb, yb, lr).item()
        for group in optimizer.param_groups:
            group["lr"] = lr
        if self.ddp_loss is not None:  # DDP all-reduces the gradients from hooks in autograd's backward
            optimizer.zero_grad(set_to_none=True)
            loss = self.ddp_loss(xb, yb)
            loss.backward()
            optimizer.step()
            # the whole batch's loss, as the gradient is: the mean of the ranks' means, as DDP averages gradients
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            return loss.item() / self.world
        if is_plain_sgd(optimizer):  # the lectures' p.data += -lr * p.grad, without optimizer.step's overhead
            return model.sgd_step(xb, yb, lr).item()  # one kernel call for the fused MLPs on the CPU
        loss, grads = model.loss_and_grads(xb, yb)
        for param, grad in zip(model.parameters(), grads):  # the optimizer's order (make_optimizer's)
            param.grad = grad
        optimizer.step()
        return loss.item()

    def fit(self) -> dict:
        """Runs the remaining steps and returns the summary. Ctrl-C (SIGINT) and SIGTERM are honoured between
        steps: the step under way completes, a checkpoint is written, then StoppedBySignal is raised. After the
        last step a checkpoint is written before the final calibration, losses and samples, so that a Ctrl-C
        during those leaves a run that --resume finishes."""
        from tqdm.auto import tqdm

        config = self.config
        if hasattr(self.model, "fit"):  # the counting bigram: no gradient steps
            for model in filter(None, (self.model, self.reference)):
                model.fit(*self.dataset.splits["train"])
            self.step = config.steps
        timing = {"fastlm": 0.0, "reference": 0.0, "steps": 0}  # this process's steps and their time
        bar = tqdm(total=config.steps, initial=self.step, disable=self.rank != 0, unit="step", dynamic_ncols=True)
        with interrupts_between_steps() as interrupted:
            while self.step < config.steps:
                self._step(timing)
                bar.update(1)
                loss = self.history["step_loss"][-1]
                if self.step % 100 == 0 or self.step == config.steps:
                    bar.set_postfix(loss=f"{loss:.4f}", lr=config.learning_rate(self.step - 1))
                if self.step % config.eval_every == 0 or self.step == config.steps:
                    val = split_loss(self.model, *self.dataset.splits["val"])
                    self.history["val"].append((self.step, val))
                    if self.rank == 0:  # (tqdm writes even where its bar is disabled)
                        bar.write(f"step {self.step}: train batch loss {loss:.4f}, val loss {val:.4f}")
                if self.step % config.checkpoint_every == 0:
                    self.save()
                signum = self._stop_requested(interrupted)
                if signum:
                    bar.close()
                    self.save()
                    self.log(f"interrupted at step {self.step}: checkpoint written to "
                             f"{self.out / 'checkpoint.pt'}; continue with --resume")
                    raise StoppedBySignal(signum)
        bar.close()
        if self.saved_step != self.step:
            self.save()
        try:
            return self._finish(timing)
        except KeyboardInterrupt:
            self.log(f"interrupted after the last step: the checkpoint of step {self.step} is in "
                     f"{self.out / 'checkpoint.pt'}; --resume finishes the run (calibration, losses, samples)")
            raise

    STOP_AGREEMENT_STEPS = 10

    def _stop_requested(self, interrupted) -> int:
        """The signal to stop by after this step (0: go on): one seen here or, under torchrun, by any rank (the
        highest number, so SIGTERM over SIGINT, on every rank). The ranks agree every STOP_AGREEMENT_STEPS steps
        (one small all-reduce), so that all stop after the same step; a rank stopping alone would leave the others
        waiting in the next step's gradient all-reduce."""
        if self.world == 1:
            return interrupted()
        if self.step % self.STOP_AGREEMENT_STEPS:
            return 0
        signum = torch.tensor([interrupted()], device=self.device)
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        return int(signum.item())

    def _step(self, timing: dict) -> None:
        xb, yb = self._batch()
        lr = self.config.learning_rate(self.step)
        start = time.perf_counter()
        self.history["step_loss"].append(self._train_step(self.model, self.optimizer, xb, yb, lr))
        timing["fastlm"] += time.perf_counter() - start
        if self.reference is not None:
            start = time.perf_counter()
            self.history["reference_step_loss"].append(
                self._train_step(self.reference, self.reference_optimizer, xb, yb, lr))
            timing["reference"] += time.perf_counter() - start
        self.step += 1
        timing["steps"] += 1

    def _finish(self, timing: dict) -> dict:
        config, splits = self.config, self.dataset.splits
        for model in filter(None, (self.model, self.reference)):
            models.calibrate_batchnorm(model, splits["train"][0])
        summary = {"steps": self.step, **{f"{name}_loss": split_loss(self.model, *splits[name]) for name in splits}}
        if timing["steps"]:
            summary["fastlm_ms_per_step"] = 1e3 * timing["fastlm"] / timing["steps"]
        if self.reference is not None:
            summary.update({f"reference_{name}_loss": split_loss(self.reference, *splits[name]) for name in splits})
            if timing["steps"]:
                summary["reference_ms_per_step"] = 1e3 * timing["reference"] / timing["steps"]
        try:
            summary["samples"] = list(sample_words(self.model, self.dataset.vocab, context_of(config),
                                                   config.samples, config.seed))
        except ConfigError as error:  # a diverged run still writes its checkpoint, summary and plot
            self.log(f"note: {error}")
            summary["samples"] = []
        self.save()
        if self.rank == 0:
            try:
                # UTF-8, a word list's own characters as they are (the samples of a custom vocabulary were \u
                # escapes); a diverged run's losses as null (NaN is not JSON)
                text = json.dumps(json_numbers(summary), indent=2, ensure_ascii=False, allow_nan=False)
                (self.out / "summary.json").write_text(text + "\n", encoding="utf-8")
                self.files_written = ["checkpoint.pt", "summary.json"] + (["loss.png"] if self._plot() else [])
            except OSError as error:
                raise ConfigError(f"cannot write in {str(self.out)!r}: {error}") from None
        return summary

    def _plot(self) -> bool:
        """loss.png: the training loss averaged over windows of 1% of the run, and the val loss, on a log axis.
        Whether it was drawn (not without matplotlib, nor for a model fit by counting)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.log("note: matplotlib is not installed, so no loss plot was drawn")
            return False
        losses = self.history["step_loss"]
        if not losses:
            return False
        window = max(1, len(losses) // 100)
        steps = range(0, len(losses) - window + 1, window)
        figure, axes = plt.subplots(figsize=(7, 4))
        axes.plot([s + window for s in steps], [sum(losses[s:s + window]) / window for s in steps],
                  label="train (batch, windowed)")
        if self.history["val"]:
            axes.plot(*zip(*self.history["val"]), "o-", label="val")
        axes.set_yscale("log", nonpositive="mask")  # a loss of 0 (a word list learnt by heart) is left out
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.legend()
        figure.tight_layout()
        figure.savefig(self.out / "loss.png", dpi=100)
        plt.close(figure)
        return True
