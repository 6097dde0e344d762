"""``fastlm train`` / ``fastlm sample`` end to end on short runs: files written, interrupt and resume
bit-identical, the plain-PyTorch twin side by side, data parallel with torchrun, bad word lists refused."""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import fastlm
import fastlm.models
from conftest import free_port
from fastlm import data
from fastlm.data import Vocabulary, build_windows
from fastlm.train import (SEEDS, ConfigError, Trainer, TrainConfig, check_options, check_seed, first_line,
                          interrupts_between_steps, is_plain_sgd, json_numbers, resumed_config, sample_words,
                          split_loss)

WORDS = ["emma", "olivia", "ava", "isabella", "sophia", "mia", "amelia", "harper", "evelyn", "abigail", "emily",
         "ella", "elizabeth", "camila", "luna", "sofia", "avery", "mila", "aria", "scarlett"] * 5


@pytest.fixture
def words_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("\n".join(WORDS) + "\n")
    return str(path)


def small_config(words_file, out, **changes):
    options = dict(steps=40, batch_size=8, eval_every=20, checkpoint_every=1000, samples=3, data=words_file,
                   out=str(out), hidden=16)
    options.update(changes)
    return TrainConfig(**options)


def rewrite_checkpoint(path, change) -> None:
    """The checkpoint at ``path`` (a file) as ``change(state)`` leaves it, as a hand edit or another version would."""
    state = torch.load(path, weights_only=False)
    change(state)
    torch.save(state, path)


def fastlm_command(*args, **env):
    return subprocess.run([sys.executable, "-m", "fastlm", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


@pytest.mark.parametrize("draw_rows, optimizer", [(Trainer.DRAW_ROWS, "sgd"), (24, "sgd"), (Trainer.DRAW_ROWS, "adam")],
                         ids=["default", "3-steps-per-draw", "adam"])
def test_interrupted_and_resumed_run_ends_bit_identical(words_file, tmp_path, monkeypatch, draw_rows, optimizer):
    """Also with batches drawn 3 steps at a time, so that the interruption falls inside a draw after several, and
    with an optimizer that keeps state of its own."""
    monkeypatch.setattr(Trainer, "DRAW_ROWS", draw_rows)
    whole = Trainer(small_config(words_file, tmp_path / "whole", optimizer=optimizer), log=lambda *_: None)
    whole.fit()

    interrupted = Trainer(small_config(words_file, tmp_path / "cut", optimizer=optimizer), log=lambda *_: None)
    train_step = Trainer._train_step

    def ctrl_c_during_step_17(self, *args):
        if self.step == 16:  # mid-step: the step completes, then the run stops at step 17
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(self, *args)

    monkeypatch.setattr(Trainer, "_train_step", ctrl_c_during_step_17)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    monkeypatch.setattr(Trainer, "_train_step", train_step)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["step"] == 17

    # --steps not given again: the checkpoint's 40 steps, with its learning-rate schedule
    resumed = Trainer(small_config(words_file, tmp_path / "cut", steps=None), resume=True, log=lambda *_: None)
    assert resumed.step == 17 and resumed.config.steps == 40
    resumed.fit()
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed.history["step_loss"] == whole.history["step_loss"]


def test_the_seed_picks_the_initialisation(words_file, tmp_path):
    def first_layer(seed):
        trainer = Trainer(small_config(words_file, tmp_path / str(seed), seed=seed), log=lambda *_: None)
        return next(iter(trainer.model.parameters()))

    assert torch.equal(first_layer(1), first_layer(1)) and not torch.equal(first_layer(1), first_layer(2))


def test_the_seed_picks_the_split(words_file, tmp_path):
    """--seed draws the train/val/test split too (as its help says): the same seed, the same split."""
    def val_rows(seed):
        trainer = Trainer(small_config(words_file, tmp_path / str(seed), seed=seed), log=lambda *_: None)
        return trainer.dataset.splits["val"][0]

    assert torch.equal(val_rows(1), val_rows(1)) and not torch.equal(val_rows(1), val_rows(2))


def test_an_optimizer_with_state_takes_the_lower_learning_rate_from_decay_at(words_file, tmp_path):
    trainer = Trainer(small_config(words_file, tmp_path, optimizer="adam", lr=0.01, lr_after=0.001, decay_at=0.5,
                                   steps=10), log=lambda *_: None)
    trainer.fit()
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [0.001]


def test_split_loss_is_the_mean_over_every_row():
    """The loss of a split taken in batches (the last one short) is the mean loss of all its rows."""
    torch.manual_seed(0)
    model = fastlm.models.build("mlp", fused=True, hidden=16)
    X, Y = torch.randint(0, 27, (30, 3)), torch.randint(0, 27, (30,))
    assert split_loss(model, X, Y, batch=8) == pytest.approx(model.loss(X, Y).item(), rel=1e-6)
    assert model.training  # measured in eval mode, left in the mode it was in
    split_loss(model.eval(), X, Y)
    assert not model.training


def test_val_losses_are_measured_every_eval_every_steps_and_at_the_last(words_file, tmp_path):
    """On the val split; at the last step too where eval_every does not divide the steps (for a model without
    BatchNorm, which calibration leaves as it is, the last is the summary's val loss)."""
    trainer = Trainer(small_config(words_file, tmp_path, model="mlp", steps=30, eval_every=20), log=lambda *_: None)
    summary = trainer.fit()
    assert [step for step, _ in trainer.history["val"]] == [20, 30]
    assert trainer.history["val"][-1][1] == summary["val_loss"] != summary["train_loss"]


def test_samples_follow_the_model():
    """A counting bigram fit on one word, 10000 times over, samples that word (each of its steps has
    probability 0.997; the sampler's seed is fixed)."""
    model = fastlm.models.build("bigram-counts", fused=False)
    vocab = Vocabulary()
    model.fit(*build_windows(["abc"] * 10000, 1, vocab))
    assert list(sample_words(model, vocab, 1, 20, seed=0)).count("abc") >= 18


def test_samples_slide_the_context_window():
    """Each drawn id joins the window at its end, the oldest leaving: a model sure that the next id is one past the
    window's last (the end after "c") spells "abc" with 3 characters of context."""

    class OnePastTheLast(torch.nn.Module):
        def forward(self, idx):
            last = idx[:, -1]
            return 50.0 * torch.nn.functional.one_hot(torch.where(last < 3, last + 1, 0), 27).float()

    assert list(sample_words(OnePastTheLast(), Vocabulary(), 3, 2, seed=0)) == ["abc", "abc"]


def test_only_plain_sgd_is_stepped_without_the_optimizer():
    """Plain SGD's step is p -= lr * grad (the models' sgd_step); momentum, weight decay or maximize need the
    optimizer's own step, as does any other optimizer."""
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert is_plain_sgd(torch.optim.SGD(params, lr=0.1))
    for options in (dict(momentum=0.9), dict(weight_decay=0.1), dict(maximize=True)):
        assert not is_plain_sgd(torch.optim.SGD(params, lr=0.1, **options)), options
    assert not is_plain_sgd(torch.optim.Adam(params))


def test_an_error_without_a_message_is_reported_by_its_type():
    assert first_line(RuntimeError("cannot write\nmore detail")) == "cannot write"
    assert first_line(OSError()) == "OSError" and first_line(ValueError(" \n ")) == "ValueError"


def test_batches_are_those_of_per_step_draws(words_file, tmp_path, monkeypatch):
    """Batches drawn several steps at a time are the rows that drawing each step's indices in turn would give."""
    monkeypatch.setattr(Trainer, "DRAW_ROWS", 24)  # 3 steps of 8 rows per draw
    trainer = Trainer(small_config(words_file, tmp_path), log=lambda *_: None)
    X, Y = trainer.dataset.splits["train"]
    generator = torch.Generator().manual_seed(trainer.config.seed)
    for _ in range(10):
        ix = torch.randint(0, len(X), (8,), generator=generator)
        xb, yb = trainer._batch()
        assert torch.equal(xb, X[ix]) and torch.equal(yb, Y[ix])


def test_resume_takes_the_checkpoint_configuration(words_file, tmp_path):
    """--resume without the original options continues the checkpointed run: its model and sizes, and the checks
    that belong to it (a CUDA-graph run's checkpoint still needs a GPU)."""
    Trainer(small_config(words_file, tmp_path, model="mlp", hidden=12, steps=10), log=lambda *_: None).fit()
    notes = []
    plain = Trainer(TrainConfig(out=str(tmp_path), steps=20), resume=True, log=notes.append)
    assert plain.config.batch_size == 8 and notes == []  # the run's own options, and nothing to say about them
    resumed = Trainer(small_config(words_file, tmp_path, steps=20), resume=True, log=notes.append)
    assert (resumed.config.model, resumed.config.hidden, resumed.step) == ("mlp", 12, 10)
    assert notes == ["note: resuming with the checkpoint's configuration; ignored: --hidden"]
    resumed.fit()
    assert resumed.step == 20
    rewrite_checkpoint(tmp_path / "checkpoint.pt", lambda state: state["config"].update(cuda_graph=True))
    with pytest.raises(ConfigError, match="needs --device cuda"):
        Trainer(small_config(words_file, tmp_path), resume=True, log=lambda *_: None)


def test_compare_trains_the_reference_twin_on_the_same_batches(words_file, tmp_path):
    trainer = Trainer(small_config(words_file, tmp_path, compare=True), log=lambda *_: None)
    summary = trainer.fit()
    fused, reference = trainer.history["step_loss"], trainer.history["reference_step_loss"]
    assert len(fused) == len(reference) == 40
    for a, b in zip(fused, reference):
        assert a == pytest.approx(b, rel=1e-4)
    assert summary["val_loss"] == pytest.approx(summary["reference_val_loss"], rel=1e-4)
    assert summary["fastlm_ms_per_step"] > 0 and summary["reference_ms_per_step"] > 0


def test_compare_fits_the_counting_twin_too(words_file, tmp_path):
    summary = Trainer(small_config(words_file, tmp_path, model="bigram-counts", compare=True, steps=None,
                                   batch_size=None, hidden=None), log=lambda *_: None).fit()
    for split in ("train", "val", "test"):
        assert summary[f"reference_{split}_loss"] == pytest.approx(summary[f"{split}_loss"], rel=1e-6)


def test_compare_run_resumes_with_its_twin(words_file, tmp_path, monkeypatch):
    """A --compare run interrupted and resumed continues both models: the same losses, side by side, and the same
    reference parameters as a run never interrupted; ms per step counts this process's steps only."""
    whole = Trainer(small_config(words_file, tmp_path / "whole", compare=True), log=lambda *_: None)
    whole.fit()
    train_step, interrupts = Trainer._train_step, []

    def slow_step_and_one_ctrl_c_at_17(self, *args):
        if self.step == 16 and not interrupts:
            interrupts.append(self.step)
            os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.002)
        return train_step(self, *args)

    monkeypatch.setattr(Trainer, "_train_step", slow_step_and_one_ctrl_c_at_17)
    with pytest.raises(KeyboardInterrupt):
        Trainer(small_config(words_file, tmp_path / "cut", compare=True), log=lambda *_: None).fit()
    resumed = Trainer(TrainConfig(out=str(tmp_path / "cut")), resume=True, log=lambda *_: None)
    summary = resumed.fit()
    assert resumed.history["reference_step_loss"] == whole.history["reference_step_loss"]
    for (name, a), (_, b) in zip(whole.reference.state_dict().items(), resumed.reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert summary["fastlm_ms_per_step"] >= 2.0 and summary["reference_ms_per_step"] >= 2.0  # 23 steps, not 40


@pytest.fixture
def python_sigint_handler():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test: a process a shell starts in the background
    inherits SIGINT ignored, and Python then leaves it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("python_sigint_handler")
def test_ctrl_c_after_the_last_step_leaves_a_run_resume_finishes(words_file, tmp_path, monkeypatch):
    """Ctrl-C during the final calibration, losses or samples: the last step's checkpoint is there, and --resume
    ends the run as if nothing had happened."""
    whole = Trainer(small_config(words_file, tmp_path / "whole"), log=lambda *_: None)
    expected = whole.fit()
    calibrate = fastlm.models.calibrate_batchnorm
    monkeypatch.setattr(fastlm.models, "calibrate_batchnorm", lambda *_: os.kill(os.getpid(), signal.SIGINT))
    notes = []
    with pytest.raises(KeyboardInterrupt):
        Trainer(small_config(words_file, tmp_path / "cut"), log=notes.append).fit()
    assert "interrupted after the last step" in notes[-1]
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["step"] == 40
    monkeypatch.setattr(fastlm.models, "calibrate_batchnorm", calibrate)
    resumed = Trainer(TrainConfig(out=str(tmp_path / "cut")), resume=True, log=lambda *_: None)
    summary = resumed.fit()
    assert {k: summary[k] for k in ("train_loss", "val_loss", "samples")} == {
        k: expected[k] for k in ("train_loss", "val_loss", "samples")}


def test_cli_train_then_sample(words_file, tmp_path):
    out = tmp_path / "run"
    result = fastlm_command("train", "--steps", "30", "--batch-size", "8", "--eval-every", "10", "--hidden", "16",
                            "--samples", "3", "--data", words_file, "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and all(summary[f"{s}_loss"] > 0 for s in ("train", "val", "test"))
    assert len(summary["samples"]) == 3
    assert (out / "checkpoint.pt").stat().st_size > 0 and (out / "loss.png").stat().st_size > 0
    sampled = fastlm_command("sample", "--checkpoint", str(out), "--count", "4")
    assert sampled.returncode == 0, sampled.stderr
    names = sampled.stdout.split()
    assert len(sampled.stdout.splitlines()) == 4 and all(set(n) <= set("abcdefghijklmnopqrstuvwxyz") for n in names)
    assert sampled.stdout.splitlines()[:3] == summary["samples"]  # the run's seed (the default was 0)


def test_sample_follows_its_seed_and_ctrl_c_is_status_130(words_file, tmp_path, monkeypatch, capsys):
    from fastlm import cli

    out = tmp_path / "run"
    Trainer(small_config(words_file, out, steps=5), log=lambda *_: None).fit()
    capsys.readouterr()

    def names(seed):
        assert cli.main(["sample", "--checkpoint", str(out), "--count", "6", "--seed", str(seed)]) == 0
        return capsys.readouterr().out.split()

    assert names(5) == names(5) != names(6)
    assert cli.main(["sample", "--checkpoint", str(out), "--count", "0"]) == 0 and capsys.readouterr().out == ""

    def interrupted(*args):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(fastlm.train, "sample_words", interrupted)
    assert cli.main(["sample", "--checkpoint", str(out)]) == 130


def test_own_characters_print_on_an_ascii_terminal(tmp_path):
    """Samples of an extended vocabulary on a stdout that cannot encode them (an ASCII locale, a Windows console
    redirected to a file): escaped, where a UnicodeEncodeError ended a finished run with a traceback."""
    path = tmp_path / "words.txt"
    path.write_text("zoë\nélise\n" * 6)
    out = tmp_path / "run"
    for command in (["train", "--model", "bigram-counts", "--extend-vocab", "--data", str(path), "--out", str(out)],
                    ["sample", "--checkpoint", str(out), "--count", "20"]):
        result = fastlm_command(*command, PYTHONIOENCODING="ascii")
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        assert "\\xe9" in result.stdout or "\\xeb" in result.stdout
    samples = json.loads((out / "summary.json").read_text(encoding="utf-8"))["samples"]
    assert any(ch in "".join(samples) for ch in "éë") and "\\u00e9" not in (out / "summary.json").read_text()


@pytest.mark.parametrize("content,message", [(None, "does not exist"), ("", "has no words"),
                                             ("anna\nzoë\n", "outside the vocabulary"),
                                             ("anna\nbob\ncarl\ndave\nemma\n", "the val split is empty"),
                                             ("an.na\nbob\n", "end-of-word token")])
def test_bad_word_lists_end_with_a_clear_error(tmp_path, content, message):
    path = tmp_path / "words.txt"
    if content is not None:
        path.write_text(content)
    result = fastlm_command("train", "--steps", "1", "--data", str(path), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_under_torchrun_an_error_is_printed_once_per_machine(tmp_path):
    """Every rank of a machine meets the same bad option: its first process (LOCAL_RANK 0) says so, and every
    process exits with status 2."""
    for local_rank, printed in (("0", True), ("1", False)):
        result = fastlm_command("sample", "--checkpoint", str(tmp_path / "nothing"), LOCAL_RANK=local_rank)
        assert result.returncode == 2 and ("no checkpoint" in result.stderr) == printed, result.stderr


def test_a_diverged_run_writes_its_losses_as_json_null(words_file, tmp_path):
    """NaN is not JSON (strict parsers refuse it): a diverged run's losses are null in summary.json."""
    result = fastlm_command("train", "--steps", "20", "--hidden", "8", "--lr", "1e30", "--data", words_file,
                            "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert summary["val_loss"] is None and summary["train_loss"] is None


@pytest.mark.parametrize("arguments,message,status", [
    (["train", "--out", ""], "--out: an empty path", 2),
    (["train", "--data", ""], "--data: an empty path", 2),
    (["sample", "--checkpoint", ""], "--checkpoint: an empty path", 2),
    (["train", "--steps", "2", "--hidden", str(10**12)], "out of memory for these sizes", 1),
    (["train", "--steps", "2", "--hidden", str(10**17)], "out of memory for these sizes", 1),  # (size overflows)
    (["train", "--steps", "2", "--hidden", str(10**19)], "--hidden must be at most", 2),
])
def test_empty_paths_and_sizes_past_memory_are_one_line_errors(tmp_path, arguments, message, status):
    """An empty path was taken as the current directory (files written there, or a confusing message); sizes past
    the memory ended in an allocator's traceback. A usage error exits 2, running out of memory 1."""
    result = subprocess.run([sys.executable, "-m", "fastlm", *arguments], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert result.returncode == status and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["checkpoint.pt", "summary.json", "loss.png"])
def test_an_output_file_that_is_a_directory_is_refused_before_training(words_file, tmp_path, name):
    """Found before the steps, not as a traceback when the run writes it at the end."""
    (tmp_path / name).mkdir()
    result = fastlm_command("train", "--steps", "5", "--hidden", "8", "--data", words_file, "--out", str(tmp_path))
    assert result.returncode == 2 and f"its {name} is not a file" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "replaces the checkpoint" not in result.stdout


def test_version():
    result = fastlm_command("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"fastlm {fastlm.__version__}", result


def test_sample_without_a_checkpoint_is_a_clear_error(tmp_path):
    result = fastlm_command("sample", "--checkpoint", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "no checkpoint" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    result = fastlm_command("sample", "--checkpoint", str(tmp_path / "broken.pt"))
    assert result.returncode == 2 and "not a readable checkpoint" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("saved, lacks", [({"model": {}, "step": 3}, "config, vocab"),
                                          (torch.zeros(2), "config, model, step, vocab")])
def test_another_torch_file_is_not_taken_for_a_checkpoint(tmp_path, saved, lacks):
    """A file torch.load reads that is not a fastlm checkpoint (a dict without its keys, a tensor) is refused in
    one line, for train --resume and sample alike."""
    torch.save(saved, tmp_path / "checkpoint.pt")
    for command in (["train", "--resume", "--out"], ["sample", "--checkpoint"]):
        result = fastlm_command(*command, str(tmp_path))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"is not a fastlm checkpoint (it lacks {lacks})" in result.stderr


@pytest.mark.parametrize("change,message,resume_message", [
    (lambda state: state["config"].update(option_of_another_version=1), "not this fastlm version's", None),
    (lambda state: state["config"].update(hidden=12), "weights do not fit its model", None),
    (lambda state: state.update(vocab=state["vocab"] + "é"), "weights do not fit its model", "are not those the"),
])
def test_a_checkpoint_that_does_not_fit_is_a_clear_error(words_file, tmp_path, change, message, resume_message):
    """A checkpoint from another fastlm version or edited by hand: one line, both to sample and to resume."""
    Trainer(small_config(words_file, tmp_path, model="mlp", steps=2), log=lambda *_: None).fit()
    rewrite_checkpoint(tmp_path / "checkpoint.pt", change)
    result = fastlm_command("sample", "--checkpoint", str(tmp_path))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(ConfigError, match=resume_message or message):
        Trainer(small_config(words_file, tmp_path, steps=4), resume=True, log=lambda *_: None).fit()


@pytest.mark.parametrize("change", ["new character", "reordered", "new character, vocabulary not extended"])
def test_resume_with_another_word_list_is_a_clear_error(words_file, tmp_path, change):
    """A resumed run shuffles and splits its word list again: another list (one with the same characters
    reordered or grown continued silently, its val and test words partly in training) cannot continue it; a
    character the checkpoint's vocabulary lacks says so (the advice was --extend-vocab, which a resume ignores)."""
    extend = change != "new character, vocabulary not extended"
    Trainer(small_config(words_file, tmp_path, steps=2, extend_vocab=extend), log=lambda *_: None).fit()
    words = open(words_file).read().split()
    with open(words_file, "w") as f:
        f.write("\n".join(words[::-1] if change == "reordered" else [*words, "zoë"]) + "\n")
    message = ("not the one the checkpoint was trained on" if extend
               else r"'ë' \(U\+00EB\); the checkpoint's vocabulary lacks them: resume with that run's word list")
    with pytest.raises((ConfigError, data.DataError), match=message):
        Trainer(small_config(words_file, tmp_path, steps=4), resume=True, log=lambda *_: None)


def test_resume_finds_a_word_list_that_has_moved(words_file, tmp_path):
    """A resumed run takes --data where its checkpoint records its words (they must be the same words: the test
    above): a list moved since could not be resumed, and the same path given again was noted as ignored."""
    Trainer(small_config(words_file, tmp_path / "run", steps=2), log=lambda *_: None).fit()
    moved = tmp_path / "moved.txt"
    os.replace(words_file, moved)
    notes = []
    trainer = Trainer(small_config(str(moved), tmp_path / "run", steps=4), resume=True, log=notes.append,
                      given={"data", "steps", "out"})
    assert trainer.config.data == str(moved) and not any("ignored" in note for note in notes), notes
    trainer.fit()


def test_a_word_list_learnt_by_heart_finishes_with_its_plot(tmp_path):
    """Losses of 0 (one word, repeated): the run ends with its summary and loss plot (log10 of 0 raised)."""
    path = tmp_path / "words.txt"
    path.write_text("ab\n" * 20)
    result = fastlm_command("train", "--model", "mlp", "--lr", "5", "--steps", "300", "--data", str(path),
                            "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    history = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["history"]["step_loss"]
    assert min(history) >= 0 and history[-1] < 1e-3
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0


@pytest.mark.parametrize("changes,message", [
    (dict(backend="bogus"), "unknown fastlm backend"), (dict(device="cuda:0"), "no CUDA GPU"),
    (dict(eval_every=0), "--eval-every must be at least 1"), (dict(checkpoint_every=0), "--checkpoint-every"),
    (dict(context=0), "--context must be at least 1"), (dict(steps=-5), "--steps must be at least 0"),
    (dict(batch_size=1), "BatchNorm needs more than one row"),
    (dict(lr=-1.0), "--lr must be at least 0"), (dict(lr=float("nan")), "--lr must be at least 0"),
    (dict(lr_after=float("inf")), "--lr-after must be a finite number"), (dict(decay_at=2.0), "at most 1"),
    (dict(model="bigram-counts", optimizer="adam", hidden=None), "fit by counting"),
    (dict(out="a_file"), "cannot create the output directory"),
    (dict(out="a_file/run"), "cannot create the output directory"),
    (dict(device="mps"), "fastlm runs on the CPU"), (dict(device="meta"), "fastlm runs on the CPU"),
    (dict(seed=2**64), "--seed must be a 64-bit integer"),
])
def test_bad_options_are_config_errors(words_file, tmp_path, changes, message):
    """Each gives the CLI's one-line error (ConfigError), before training starts."""
    if changes.get("device") == "cuda:0" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    (tmp_path / "a_file").write_text("not a directory")
    if "out" in changes:
        changes["out"] = str(tmp_path / changes["out"])
    options = {"model": "mlp-bn", "out": str(tmp_path / "run"), **changes}
    with pytest.raises(ConfigError, match=message):
        Trainer(small_config(words_file, **options), log=lambda *_: None)


def test_the_seeds_taken_are_torch_manual_seeds():
    """Negative seeds too, down to torch's least; one past either end is refused, as torch refuses it."""
    for seed in (SEEDS[0], -1, 0, SEEDS[1]):
        check_seed(seed)
        torch.Generator().manual_seed(seed)
    for seed in (SEEDS[0] - 1, SEEDS[1] + 1):
        with pytest.raises(ConfigError, match="--seed must be a 64-bit integer"):
            check_seed(seed)
        with pytest.raises((ValueError, RuntimeError)):
            torch.Generator().manual_seed(seed)


def test_counts_are_taken_up_to_the_largest_int64():
    """torch's sizes and step counters are int64: 2**63 - 1 is taken, one more refused."""
    check_options(TrainConfig(steps=2**63 - 1, eval_every=2**63 - 1, checkpoint_every=2**63 - 1))
    with pytest.raises(ConfigError, match=f"--eval-every must be at most {2**63 - 1}, got {2**63}"):
        check_options(TrainConfig(eval_every=2**63))


def test_the_summary_writes_every_non_finite_loss_as_null():
    """A diverged run's losses may be NaN or +-inf; JSON has neither (json.dumps(allow_nan=False) refuses both)."""
    summary = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "loss": 2.5, "steps": 3, "samples": ["ab"]}
    written = json_numbers(summary)
    assert written == {"nan": None, "inf": None, "-inf": None, "loss": 2.5, "steps": 3, "samples": ["ab"]}
    json.dumps(written, allow_nan=False)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc, a folder no one can write files in")
def test_an_output_folder_that_takes_no_files_is_a_config_error(words_file):
    """An existing folder that cannot take files is refused before training, not at the first checkpoint."""
    with pytest.raises(ConfigError, match="cannot write files there"):
        Trainer(small_config(words_file, "/proc/self"), log=lambda *_: None)


def test_a_checkpoint_that_cannot_be_written_leaves_no_temporary_file(words_file, tmp_path):
    trainer = Trainer(small_config(words_file, tmp_path, steps=2), log=lambda *_: None)
    (tmp_path / "checkpoint.pt").mkdir()  # os.replace cannot put a file there
    with pytest.raises(ConfigError, match="cannot write"):
        trainer.fit()
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


def test_a_diverged_run_writes_its_summary_without_samples(words_file, tmp_path):
    notes = []
    summary = Trainer(small_config(words_file, tmp_path, lr=1e30, lr_after=1e30), log=notes.append).fit()
    assert math.isnan(summary["val_loss"]) and summary["samples"] == []
    assert any("training diverged" in note for note in notes)
    assert (tmp_path / "summary.json").exists() and (tmp_path / "loss.png").exists()
    result = fastlm_command("sample", "--checkpoint", str(tmp_path))
    assert result.returncode == 2 and "training diverged" in result.stderr and "Traceback" not in result.stderr


def test_a_new_run_over_an_earlier_one_says_so(words_file, tmp_path):
    notes = []
    Trainer(small_config(words_file, tmp_path, steps=2), log=notes.append).fit()
    assert not any("replaces" in note for note in notes)
    Trainer(small_config(words_file, tmp_path, steps=2), log=notes.append)
    assert any("replaces the checkpoint of an earlier run" in note for note in notes)


def test_a_counting_model_says_which_options_it_ignores(words_file, tmp_path):
    """Once, when the run starts: resumed, the run has no schedule options given to ignore."""
    notes = []
    config = small_config(words_file, tmp_path, model="bigram-counts", hidden=None, lr=5.0, lr_after=1.0, decay_at=0.5)
    Trainer(config, log=notes.append).fit()
    assert notes == ["note: the bigram-counts model is fit by counting, in one pass over the training split; "
                     "ignored: --steps, --batch-size, --lr, --lr-after, --decay-at"]
    notes.clear()
    Trainer(TrainConfig(out=str(tmp_path)), resume=True, given={"out"}, log=notes.append)
    assert notes == []


def test_a_run_resumes_from_another_folder(words_file, tmp_path, monkeypatch):
    """The word list's path is kept absolute, so a run started with a relative one resumes from anywhere."""
    monkeypatch.chdir(os.path.dirname(words_file))
    Trainer(small_config(os.path.basename(words_file), tmp_path / "run", steps=2), log=lambda *_: None).fit()
    monkeypatch.chdir("/")
    resumed = Trainer(TrainConfig(out=str(tmp_path / "run"), steps=4), resume=True, log=lambda *_: None)
    assert resumed.config.data == words_file
    # and from a copy in another folder, which --out names: the option every resumed run gives, never ignored
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    notes = []
    copy = Trainer(TrainConfig(out=str(tmp_path / "copy"), steps=4), resume=True, given={"out", "steps"},
                   log=notes.append)
    assert copy.config.out == str(tmp_path / "copy") and notes == [], notes


def test_a_checkpoint_without_its_words_record_keeps_its_word_list(words_file, tmp_path):
    """A checkpoint of an older fastlm has no record of its words to check another list against: the run goes on
    with the list it trained on, and a --data given is noted as ignored."""
    Trainer(small_config(words_file, tmp_path / "run", steps=2), log=lambda *_: None).fit()
    rewrite_checkpoint(tmp_path / "run" / "checkpoint.pt", lambda state: state.pop("words"))
    shutil.copy(words_file, tmp_path / "moved.txt")
    notes = []
    resumed = Trainer(TrainConfig(out=str(tmp_path / "run"), data=str(tmp_path / "moved.txt")), resume=True,
                      given={"out", "data"}, log=notes.append)
    assert resumed.config.data == words_file
    assert notes == ["note: resuming with the checkpoint's configuration; ignored: --data"]


@pytest.mark.parametrize("saved_steps, decay_at", [(200, 0.5), (7, 0.5), (300_000, 1 / 3), (10, 0.0), (10, 1.0)])
def test_resuming_with_other_steps_keeps_the_learning_rate_drop(saved_steps, decay_at):
    saved = TrainConfig(steps=saved_steps, lr=0.1, lr_after=0.01, decay_at=decay_at)
    for steps in (saved_steps // 2, saved_steps - 1, saved_steps + 1, 2 * saved_steps, 5 * saved_steps):
        config = resumed_config(saved, steps, saved_steps // 2, "run")
        shared = range(min(steps, saved_steps))
        assert [config.learning_rate(s) for s in shared] == [saved.learning_rate(s) for s in shared]
        assert all(config.learning_rate(s) == saved.lr_after for s in range(saved_steps, steps))
    with pytest.raises(ConfigError, match="past the end"):
        resumed_config(saved, saved_steps // 2 - 1, saved_steps // 2, "run")


def test_the_resumed_drop_is_at_its_step_where_the_fraction_rounds_up():
    """A 14-step run drops at step 7; resumed for 25 steps the fraction is 6.5 / 25, half a step early, since
    7 / 25 * 25 rounds up to 7.000000000000001 and step 7 would still take the first rate."""
    saved = TrainConfig(steps=14, lr=0.1, lr_after=0.01, decay_at=0.5)
    config = resumed_config(saved, 25, 3, "run")
    assert [config.learning_rate(step) for step in (6, 7, 24)] == [0.1, 0.01, 0.01]


def test_a_compare_checkpoint_without_its_reference_twin_is_refused(words_file, tmp_path):
    Trainer(small_config(words_file, tmp_path, steps=2, compare=True), log=lambda *_: None).fit()
    rewrite_checkpoint(tmp_path / "checkpoint.pt", lambda state: state.pop("reference"))
    with pytest.raises(ConfigError, match="has no reference twin to continue"):
        Trainer(TrainConfig(out=str(tmp_path), steps=4), resume=True, log=lambda *_: None)


def test_resume_names_an_option_given_at_its_default_value(words_file, tmp_path):
    """--model mlp-bn is the default, yet given when resuming an mlp run it is ignored, and the note says so."""
    out = str(tmp_path / "run")
    trained = fastlm_command("train", "--steps", "4", "--batch-size", "8", "--model", "mlp", "--hidden", "16",
                             "--samples", "0", "--data", words_file, "--out", out)
    assert trained.returncode == 0, trained.stderr
    resumed = fastlm_command("train", "--resume", "--out", out, "--model", "mlp-bn", "--seed", "42", "--steps", "6")
    assert resumed.returncode == 0, resumed.stderr
    assert "note: resuming with the checkpoint's configuration; ignored: --model\n" in resumed.stdout


def test_sample_refuses_a_negative_count(words_file, tmp_path):
    result = fastlm_command("sample", "--checkpoint", str(tmp_path), "--count", "-3")
    assert result.returncode == 2 and "--count must be at least 0" in result.stderr


def test_compare_under_torchrun_is_a_config_error(words_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="does not combine with torchrun"):
        Trainer(small_config(words_file, tmp_path, compare=True), log=lambda *_: None)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_training_on_the_cpu(words_file, tmp_path, dtype):
    """The one-call training step is fp32/fp64 only: half-precision models train through their layers."""
    trainer = Trainer(small_config(words_file, tmp_path, dtype=dtype, steps=10), log=lambda *_: None)
    summary = trainer.fit()
    assert next(trainer.model.parameters()).dtype == getattr(torch, dtype)
    assert all(0 < summary[f"{name}_loss"] < 10 for name in ("train", "val", "test"))


def test_recipes_set_steps_and_batch_size(words_file, tmp_path):
    """Unset --steps and --batch-size come from the model's lecture recipe: the neural bigram's 100 steps over
    the whole training split (batch_size 0), mlp-bn's 200k steps of 32."""
    bigram = Trainer(small_config(words_file, tmp_path, model="bigram", steps=None, batch_size=None, hidden=None),
                     log=lambda *_: None)
    assert (bigram.config.steps, bigram.config.batch_size) == (100, 0)
    X, _ = bigram.dataset.splits["train"]
    assert bigram._batch()[0].shape[0] == len(X)
    mlp = Trainer(small_config(words_file, tmp_path, steps=None, batch_size=None), log=lambda *_: None)
    assert (mlp.config.steps, mlp.config.batch_size) == (200_000, 32)


def test_a_given_lr_drops_by_the_recipes_factor():
    """--lr alone: after the drop, a tenth of it, as the recipe's 0.1 -> 0.01 (it was the recipe's 0.01, so --lr
    0.001 rose tenfold at the drop); --lr-after still sets its own."""
    recipe = fastlm.models.MLP.recipe  # mlp and mlp-bn: 0.1, then 0.01 from half the steps
    assert TrainConfig(lr=0.001).with_recipe(recipe).lr_after == pytest.approx(0.0001)
    assert TrainConfig().with_recipe(recipe).lr_after == pytest.approx(0.01)
    assert TrainConfig(lr=0.001, lr_after=0.05).with_recipe(recipe).lr_after == 0.05


def test_sample_runs_a_gpu_checkpoint_on_the_cpu(words_file, tmp_path):
    """A checkpoint's device and backend (here made to say cuda) do not stop sampling on --device cpu."""
    Trainer(small_config(words_file, tmp_path, steps=5), log=lambda *_: None).fit()
    rewrite_checkpoint(tmp_path / "checkpoint.pt",
                       lambda state: state["config"].update(device="cuda", backend="cuda"))
    result = fastlm_command("sample", "--checkpoint", str(tmp_path), "--count", "3")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_data_parallel_with_torchrun_equals_one_process_on_the_whole_batch(words_file, tmp_path, backend):
    """2 gloo ranks with batch 8 each (synchronised BatchNorm, DDP) against 1 process with batch 16: the same
    weights, the same logged batch losses (the whole batch's, not rank 0's half), each line printed once; on the
    kernels and on the torch backend (whose synchronised BatchNorm is torch ops). The checkpoint then resumes in
    one process with its batch of 16 rows, as the single run's does."""
    common = ["--steps", "12", "--eval-every", "12", "--hidden", "16", "--samples", "1", "--data", words_file,
              "--backend", backend]
    single = fastlm_command("train", *common, "--batch-size", "16", "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    parallel = run_as_a_group([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(free_port()), "-m", "fastlm", "train", *common, "--batch-size", "8",
                               "--out", str(tmp_path / "two")], timeout=300)
    assert parallel.returncode == 0, parallel.stderr
    assert parallel.stdout.count("step 12: train batch loss") == 1, parallel.stdout
    for run in ("one", "two"):
        resumed = fastlm_command("train", "--resume", "--steps", "18", "--out", str(tmp_path / run))
        assert resumed.returncode == 0, resumed.stderr
        assert ("so the batch stays 16 rows" in resumed.stdout) == (run == "two"), resumed.stdout
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    assert one["model"].keys() == two["model"].keys() and two["config"]["batch_size"] == 16
    for key in one["model"]:
        torch.testing.assert_close(two["model"][key], one["model"][key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two["history"]["step_loss"], one["history"]["step_loss"], rtol=1e-5, atol=1e-6)


def test_an_unwritable_out_under_torchrun_stops_every_rank_with_one_line(words_file, tmp_path):
    """Rank 0 alone writes, so it alone can find --out unusable: the ranks agree on it before training (rank 1 went
    on into the first step's collective and ended in a traceback of a closed connection)."""
    (tmp_path / "a_file").write_text("")
    run = run_as_a_group([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "-m", "fastlm", "train", "--steps", "5", "--batch-size", "4", "--hidden",
                          "8", "--data", words_file, "--out", str(tmp_path / "a_file" / "run")], timeout=300)
    assert run.stderr.count("fastlm train: error: --out") == 1, run.stderr
    assert "[rank1]: Traceback" not in run.stderr and "exitcode  : 2" in run.stderr, run.stderr
    # and no rank aborts on its way out (see test_leaving_the_process_group_ends_its_threads)
    assert "terminate called" not in run.stderr and "SIGABRT" not in run.stderr, run.stderr


LEAVE_AFTER_AN_OPTIMIZER = """
import os, sys, torch
from fastlm.train import distributed_rank, leave_process_group
distributed_rank(torch.device("cpu"))
torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # the first optimizer imports torch._dynamo
leave_process_group()
threads = sorted(open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task"))
with open(os.path.join(sys.argv[1], "threads_of_rank_" + os.environ["RANK"]), "w") as file:
    file.write(" ".join(threads))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists its threads in Linux's /proc")
def test_leaving_the_process_group_ends_its_threads(tmp_path):
    """A rank that leaves the group (as the CLI does on every path) keeps none of gloo's threads: ones that lived on
    to interpreter exit made a rank abort there now and then ("terminate called without an active exception")."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVE_AFTER_AN_OPTIMIZER)
    run = run_as_a_group([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(script), str(tmp_path)], timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    threads = [(tmp_path / f"threads_of_rank_{rank}").read_text() for rank in (0, 1)]
    assert not any("gloo" in names for names in threads), threads


TRAIN_RECORDING_WHAT_OUTLIVES_THE_GROUP = """
import gc, os, sys
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from fastlm.cli import main
destroy_process_group = dist.destroy_process_group
def destroy_and_record(*args, **kwargs):
    alive = sum(isinstance(thing, DistributedDataParallel) for thing in gc.get_objects())
    with open(os.path.join(sys.argv[1], "ddp_models_at_destroy_of_rank_" + os.environ["RANK"]), "w") as file:
        file.write(str(alive))
    destroy_process_group(*args, **kwargs)
dist.destroy_process_group = destroy_and_record
sys.exit(main(sys.argv[2:]))
"""


def test_the_ddp_model_is_gone_before_its_process_group(words_file, tmp_path):
    """A group that dies with its DistributedDataParallel model can deadlock (see leave_process_group): the CLI lets
    the model go first."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN_RECORDING_WHAT_OUTLIVES_THE_GROUP)
    run = run_as_a_group([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(script), str(tmp_path), "train", "--steps", "2", "--batch-size", "4",
                          "--hidden", "8", "--samples", "1", "--data", words_file, "--out", str(tmp_path / "run")],
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert [(tmp_path / f"ddp_models_at_destroy_of_rank_{rank}").read_text() for rank in (0, 1)] == ["0", "0"]


def test_resuming_in_another_number_of_processes_keeps_the_batch(words_file, tmp_path):
    """A checkpoint records the processes it trained in; resumed in another number, each takes its share of the
    same batch, or the run is refused where the batch does not split evenly."""
    Trainer(small_config(words_file, tmp_path, steps=2, batch_size=3), log=lambda *_: None).fit()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    state["world"] = 2  # as a run of 2 processes of 3 rows writes it; resumed in this one process: 6 rows
    torch.save(state, tmp_path / "checkpoint.pt")
    notes = []
    assert Trainer(small_config(words_file, tmp_path, steps=4), resume=True, log=notes.append).config.batch_size == 6
    assert notes[-1] == ("note: the checkpoint's run trained in 2 processes of 3 rows; resumed in 1, 6 rows each, "
                         "so the batch stays 6 rows")
    state["world"] = 4
    state["config"]["batch_size"] = 1
    torch.save(state, tmp_path / "checkpoint.pt")
    trainer = Trainer(small_config(words_file, tmp_path, steps=4), resume=True, log=notes.append)
    assert trainer.config.batch_size == 4
    trainer.world = 3  # as torchrun --nproc_per_node 3 would run it
    with pytest.raises(ConfigError, match="its batch of 4 rows does not split over 3"):
        trainer._same_global_batch(dataclasses.replace(trainer.config, batch_size=1), 4)


def end_group(run: subprocess.Popen) -> None:
    """Ends ``run`` (still running) and its process group. SIGTERM first: torchrun then stops its worker ranks,
    which run in sessions of their own and would outlive a killed torchrun, SIGKILLing them after its shutdown
    timeout (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s); the group gets SIGKILL after 60."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(run.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            run.wait(timeout=60)
        os.killpg(run.pid, signal.SIGKILL)


def run_as_a_group(command, timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True)`` in a process group of its own, ended whole after
    ``timeout`` seconds (what it printed is kept, and the run's stderr says it was ended)."""
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_group(run)
        stdout, stderr = run.communicate(timeout=30)  # a rank still holding the pipes fails the test, not the run
        stderr += f"\n(ended by the test after {timeout} s)"
    return subprocess.CompletedProcess(command, run.returncode, stdout, stderr)


def interrupt_once_checkpointed(command, out, sig=signal.SIGINT) -> tuple[str, int]:
    """Runs ``command`` in its own process group, sends the group ``sig`` (SIGINT: a terminal's Ctrl-C) once the
    run has written its first checkpoint in ``out``, and returns the run's output and exit code."""
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint.pt").exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert run.poll() is None, run.communicate()[0]
        os.killpg(run.pid, sig)
        return run.communicate(timeout=120)[0], run.returncode
    finally:
        if run.poll() is None:
            end_group(run)


def test_cli_ctrl_c_resume_and_sample(words_file, tmp_path):
    """The CLI as a user runs it: Ctrl-C mid-run, --resume without repeating any option, then sample; the
    resumed run ends with the parameters of a run never interrupted, bit for bit."""
    options = ["--model", "mlp", "--steps", "30000", "--batch-size", "8", "--hidden", "16", "--eval-every", "1000",
               "--checkpoint-every", "200", "--samples", "2", "--data", words_file]
    whole = fastlm_command("train", *options, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    cut = tmp_path / "cut"
    output, code = interrupt_once_checkpointed([sys.executable, "-m", "fastlm", "train", *options, "--out", str(cut)],
                                               cut)
    step = torch.load(cut / "checkpoint.pt", weights_only=False)["step"]
    assert f"interrupted at step {step}:" in output and 0 < step < 30000 and code == 130, (code, output)
    resumed = fastlm_command("train", "--resume", "--out", str(cut))
    assert resumed.returncode == 0, resumed.stderr
    one = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    two = torch.load(cut / "checkpoint.pt", weights_only=False)
    assert two["step"] == 30000
    for key, value in one["model"].items():
        assert torch.equal(two["model"][key], value), key
    sampled = fastlm_command("sample", "--checkpoint", str(cut), "--count", "2")
    assert sampled.returncode == 0 and len(sampled.stdout.splitlines()) == 2, sampled.stderr


def test_sigterm_stops_after_a_step_with_its_checkpoint_and_exit_code(words_file, tmp_path):
    """A scheduler's SIGTERM is honoured as Ctrl-C is (the step under way completes, a checkpoint is written), and
    the exit code says which signal it was: 128 + 15, as for a process SIGTERM killed."""
    out = tmp_path / "run"
    output, code = interrupt_once_checkpointed(
        [sys.executable, "-m", "fastlm", "train", "--model", "mlp", "--steps", "1000000", "--batch-size", "8",
         "--hidden", "16", "--eval-every", "1000000", "--checkpoint-every", "200", "--data", words_file, "--out",
         str(out)], out, signal.SIGTERM)
    step = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    assert f"interrupted at step {step}:" in output and code == 128 + signal.SIGTERM, (code, output)


def test_of_two_signals_the_higher_stops_the_run():
    """Ctrl-C and a scheduler's SIGTERM within the same step, in either order: the run stops by SIGTERM (exit 143),
    as the ranks of a torchrun run agree on the highest signal any of them received."""
    for signals in ((signal.SIGINT, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT)):
        with interrupts_between_steps() as interrupted:
            assert interrupted() == 0
            for signum in signals:
                os.kill(os.getpid(), signum)
            assert interrupted() == signal.SIGTERM


def test_ctrl_c_under_torchrun_stops_every_rank_after_the_same_step(words_file, tmp_path):
    """Ctrl-C reaches torchrun and both ranks: they agree to stop after one step, rank 0 writes the checkpoint
    of that step and says so once."""
    out = tmp_path / "run"
    output, _ = interrupt_once_checkpointed(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "fastlm", "train", "--steps", "1000000", "--batch-size", "8", "--hidden", "16", "--eval-every",
         "1000000", "--checkpoint-every", "200", "--data", words_file, "--out", str(out)], out)
    step = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    assert output.count("interrupted at step") == 1, output
    assert f"interrupted at step {step}:" in output and step % Trainer.STOP_AGREEMENT_STEPS == 0


def test_cuda_graph_on_the_cpu_is_a_clear_error(tmp_path):
    result = fastlm_command("train", "--steps", "1", "--cuda-graph", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "--cuda-graph" in result.stderr and "--device cuda" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("model,world,message", [("mlp-bn", 2, "torchrun"), ("resblock", 1, "plain SGD"),
                                                 ("bigram-counts", 1, "plain SGD")])
def test_cuda_graph_refuses_what_it_cannot_capture(words_file, tmp_path, model, world, message):
    from fastlm.train import ConfigError, check_cuda_graph, make_optimizer, models

    config = small_config(words_file, tmp_path, model=model, cuda_graph=True)
    network = models.build(model, fused=False)
    config = config.with_recipe(network.recipe)
    with pytest.raises(ConfigError, match=message):
        check_cuda_graph(config, torch.device("cuda"), world, make_optimizer(config, network))


@pytest.mark.parametrize("model", ["bigram", "mlp", "mlp-bn", "resmlp"])
def test_cuda_graph_accepts_the_models_trained_by_plain_sgd(words_file, tmp_path, model):
    from fastlm.train import check_cuda_graph, make_optimizer, models

    network = models.build(model, fused=False)
    config = small_config(words_file, tmp_path, model=model, cuda_graph=True).with_recipe(network.recipe)
    check_cuda_graph(config, torch.device("cuda"), 1, make_optimizer(config, network))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_run_trains_like_the_uncaptured_run(words_file, tmp_path, backend):
    from fastlm import backends

    if backends.why_unavailable(backend):
        pytest.skip(backends.why_unavailable(backend))
    runs = [Trainer(small_config(words_file, tmp_path / str(graph), device="cuda", backend=backend, cuda_graph=graph,
                                 steps=60), log=lambda *_: None) for graph in (False, True)]
    for run in runs:
        run.fit()
    eager, graphed = runs
    assert graphed.captured_step is not None
    for a, b in zip(eager.history["step_loss"], graphed.history["step_loss"]):
        assert b == pytest.approx(a, rel=1e-5)
    # val losses at steps 20 and 40 use the running statistics as the replays left them (before calibration)
    assert len(graphed.history["val"]) == len(eager.history["val"]) >= 2
    for (step_a, a), (step_b, b) in zip(eager.history["val"], graphed.history["val"]):
        assert step_b == step_a and b == pytest.approx(a, rel=1e-5)
    for (name, a), (_, b) in zip(eager.model.state_dict().items(), graphed.model.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_the_step_a_cuda_graph_records_is_the_trainers_sgd_step():
    """CapturedStep's recorded function, run uncaptured on the CPU: the same update as the trainer's eager step
    (the graph itself needs a GPU; the test above runs it there)."""
    from fastlm import models
    from fastlm.cuda_graph import CapturedStep

    torch.manual_seed(0)
    model = models.build("mlp-bn", fused=True)
    twin = models.build("mlp-bn", fused=True)
    twin.load_state_dict(model.state_dict())
    x, y = torch.randint(0, 27, (32, 3)), torch.randint(0, 27, (32,))
    step = CapturedStep.__new__(CapturedStep)  # its buffers, without the capture
    step.model, step.params, step.x, step.y = model, list(model.parameters()), x, y
    step.lr = torch.tensor(0.1)
    loss = step._step()
    twin_loss = twin.sgd_step(x, y, 0.1)
    assert loss.item() == twin_loss.item()
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
