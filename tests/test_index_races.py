"""Index tensors rewritten by another thread while an op runs (a data race in the caller's code, such as a loader
refilling a target buffer in place): the CPU kernels must raise or compute, never read or write out of bounds.
They check and read their own copy of the targets and token ids; checked in the caller's tensor and read there
again, an index made out of range between the two was an unchecked offset (a crash within a few hundred calls).
Each race runs in a child process, so that a crash fails the test instead of ending the run."""

import subprocess
import sys
import textwrap

import pytest

CALLS = {
    "cross_entropy": "ops.cross_entropy(logits.clone().requires_grad_(), targets).backward()",
    "embedding_linear_gather": "ops.embedding_linear(idx, table, w1, b1, strategy='gather')",
    "embedding_linear_table": "ops.embedding_linear(idx, table, w1, b1, strategy='table')",
    "mlp_loss_and_grads": "ops.mlp_loss_and_grads(idx, targets, table, w1, b1, w2, b2)",
}

RACE = """
import threading
import time
import torch
import fastlm.ops as ops

B, T, V, D, H = 2048, 3, 27, 10, 64
torch.manual_seed(0)
idx, targets = torch.randint(0, V, (B, T)), torch.randint(0, V, (B,))
logits, table = torch.randn(B, V), torch.randn(V, D)
w1, b1, w2, b2 = torch.randn(H, T * D), torch.randn(H), torch.randn(V, H), torch.randn(V)
stop = threading.Event()

def rewrite_in_place():
    saved = [(t, t.clone(), torch.full_like(t, 10**12 if t is idx else -10**12)) for t in (idx, targets)]
    while not stop.is_set():
        for t, good, bad in saved:
            t.copy_(bad)
            t.copy_(good)

writer = threading.Thread(target=rewrite_in_place)
writer.start()
raised = calls = 0
deadline = time.monotonic() + 60
try:
    # 300 calls at least, and on until the writer has raced one (the thread switches need not come within them)
    while calls < 300 or (raised == 0 and time.monotonic() < deadline):
        calls += 1
        try:
            CALL
        except IndexError:
            raised += 1
finally:
    stop.set()
    writer.join()
print("raised", raised)
"""


@pytest.mark.parametrize("op", CALLS)
def test_indices_rewritten_during_the_op_are_never_used_unchecked(op):
    script = textwrap.dedent(RACE).replace("CALL", CALLS[op])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"status {done.returncode}: {done.stderr[-2000:]}"
    raised = int(done.stdout.split()[-1])
    assert raised > 0, "the writer never raced the op: the test checked nothing"
