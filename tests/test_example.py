"""examples/train_digits.py: one short epoch trains each model, the CLI is seeded, and two-process
DistributedDataParallel (gloo) takes the same steps as one process on the combined batch."""
import importlib.util
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason="the example's data ship with scikit-learn: pip install -e '.[examples]'")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"
_spec = importlib.util.spec_from_file_location("train_digits", SCRIPT)
td = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(td)


@pytest.fixture(autouse=True)
def _one_thread():
    """One CPU thread, as the script uses: tiny ops only lose from more on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return td.load_data(seed=0, test_size=0.25, subset=256)


@pytest.mark.parametrize("kind, parameterization", [("scs", "rohrer"), ("scs", "pisoni"),
                                                    ("conv2d", "rohrer")],
                         ids=["scs-rohrer", "scs-pisoni", "conv2d"])
def test_one_epoch_lowers_loss_and_changes_every_parameter(data, kind, parameterization):
    x, y = data[0], data[1]
    args = td.parse_args(["--batch-size", "32", "--parameterization", parameterization])
    torch.manual_seed(0)
    model = td.build_model(kind, args.channels, parameterization)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = td.Trainer(model, args, torch.device("cpu"), td.LR[kind], total_steps=len(y) // 32)
    loss_before, _ = trainer.evaluate(x, y)
    _, _, steps, _ = trainer.train_epoch(x, y, torch.Generator().manual_seed(0))
    loss_after, _ = trainer.evaluate(x, y)

    assert steps == len(y) // 32
    assert loss_after < loss_before, f"loss on the epoch's images went {loss_before:.4f} -> {loss_after:.4f}"
    unchanged = {name for name, p in model.named_parameters() if torch.equal(p.detach(), before[name])}
    # Pisoni's q = q_raw² / 10 starts at q_raw = 0, where its gradient 2·q_raw/10 is zero:
    # like the Keras layer, it stays there.
    stationary = {"0.q_raw", "2.q_raw"} if parameterization == "pisoni" else set()
    assert unchanged <= stationary, f"parameters unchanged by an epoch: {sorted(unchanged)}"


def test_cli_is_seeded_prints_the_table_and_writes_the_plot(tmp_path, capsys):
    backend = os.environ.get("SCD_BACKEND")
    argv = ["--subset", "128", "--batch-size", "32", "--max-steps", "3", "--backend", "reference",
            "--plot", str(tmp_path / "curves.png")]
    first, second = td.main(argv), td.main(argv)
    out = capsys.readouterr().out

    assert os.environ.get("SCD_BACKEND") == backend, "--backend must not outlive main()"
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in ("| scs-rohrer | 6,092 |", "| conv2d | 6,090 |", "SCD backend reference"):
        assert row in out
    for a, b in zip(first, second):
        assert a["model"] == b["model"] and a["steps"] == [3]
        for name, value in a["state_dict"].items():
            assert torch.equal(value, b["state_dict"][name]), f"{a['model']}.{name} differs between runs"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gloo_two_processes_match_one_process_on_the_combined_batch(tmp_path):
    # Batch 33 splits 17 / 16 over the ranks: uneven slices must still give the combined step.
    common = ["--batch-size", "33", "--max-steps", "3", "--plot", ""]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(SCRIPT), "--ddp",
           "--save-state", str(tmp_path / "ddp"), *common]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in 240 s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    td.main(["--save-state", str(tmp_path / "single"), *common])

    for model in ("scs-rohrer", "conv2d"):
        rank0 = torch.load(tmp_path / "ddp" / f"{model}_rank0.pt")
        rank1 = torch.load(tmp_path / "ddp" / f"{model}_rank1.pt")
        single = torch.load(tmp_path / "single" / f"{model}_rank0.pt")
        for name, value in rank0.items():
            assert torch.equal(value, rank1[name]), f"{model}.{name} differs between ranks"
            torch.testing.assert_close(value, single[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{model}.{name}, DDP vs one process: {m}")
