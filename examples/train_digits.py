"""Train a small sharpened-cosine-similarity network and a conv2d twin on scikit-learn's 8x8 digits.

The SCS network follows Rohrer's published guidance: SCD2d layers with MaxAbsPool2d, and no
activation function or batch norm. The conv2d network has the same layout and the same channel
counts (nn.Conv2d + ReLU + MaxPool2d), so the two differ by one parameter per layer: an SCD2d
layer keeps one ``log_q`` where nn.Conv2d has nothing, and its ``p`` per kernel matches the
conv's bias per kernel.

    python examples/train_digits.py                        # CPU, reference backend, both models
    python examples/train_digits.py --device cuda --channels-last --amp bf16   # Triton kernels
    python examples/train_digits.py --parameterization pisoni                  # the Keras layer
    torchrun --nproc_per_node 2 examples/train_digits.py --ddp   # DistributedDataParallel

The digits ship with scikit-learn (``pip install -e ".[examples]"``); nothing is downloaded.
A stratified, seeded split holds out ``--test-size`` of the images; only the training part is
trained on, and the test accuracy is measured on the held-out part after every epoch.
``--backend`` sets ``SCD_BACKEND`` for the process, which every SCD2d call reads.
"""
import argparse
import contextlib
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import scd_triton

MODELS = ("scs", "conv2d")
LR = {"scs": 5e-2, "conv2d": 1e-2}  # best of 3e-3 ... 1e-1 on seeds 0-4; SCS wants the higher rate


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--parameterization", choices=("rohrer", "pisoni"), default="rohrer",
                    help="SCD2d parameterization of the SCS network")
    ap.add_argument("--channels", type=int, nargs=2, default=(16, 32), metavar=("C1", "C2"))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64, help="global batch (all ranks together)")
    ap.add_argument("--lr", type=float, default=None,
                    help="Adam learning rate for every model, cosine-annealed to 0 over the run "
                         f"(default per model: {LR})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-size", type=float, default=0.25, help="held-out fraction")
    ap.add_argument("--subset", type=int, default=None, help="train on the first N training images")
    ap.add_argument("--max-steps", type=int, default=None, help="stop each model after N steps")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; 8x8 images gain nothing from more, and shared cores "
                         "make more much slower")
    ap.add_argument("--backend", choices=("auto", "reference", "triton"), default=None,
                    help="SCD backend; sets $SCD_BACKEND (default: leave it, i.e. auto)")
    ap.add_argument("--channels-last", action="store_true", help="channels_last input and weights")
    ap.add_argument("--amp", choices=("none", "bf16"), default="none", help="torch.autocast dtype")
    ap.add_argument("--ddp", action="store_true",
                    help="DistributedDataParallel under torchrun (gloo on CPU, NCCL on CUDA)")
    ap.add_argument("--plot", default="examples/out/train_digits.png",
                    help="learning-curve PNG ('' for none)")
    ap.add_argument("--save-state", default=None, metavar="DIR",
                    help="write each model's final state_dict to DIR/<model>_rank<r>.pt")
    return ap.parse_args(argv)


def load_data(seed, test_size, subset=None):
    """The 8x8 digits scaled to [0, 1], as a stratified train / held-out test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8]
    y = torch.tensor(digits.target, dtype=torch.long)
    i_train, i_test = train_test_split(torch.arange(len(y)).numpy(), test_size=test_size,
                                       random_state=seed, stratify=y.numpy())
    i_train = i_train[:subset]
    return x[i_train], y[i_train], x[i_test], y[i_test]


def build_model(kind, channels=(16, 32), parameterization="rohrer", n_classes=10):
    """An SCS network (SCD2d + MaxAbsPool2d, no activation or norm) or its conv2d twin."""
    c1, c2 = channels
    if kind == "scs":
        layers = [scd_triton.SCD2d(1, c1, 3, padding=1, parameterization=parameterization),
                  scd_triton.MaxAbsPool2d(2),
                  scd_triton.SCD2d(c1, c2, 3, padding=1, parameterization=parameterization),
                  scd_triton.MaxAbsPool2d(2)]
    elif kind == "conv2d":
        layers = [nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                  nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    else:
        raise ValueError(f"model must be one of {MODELS}, got {kind!r}")
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c2 * 2 * 2, n_classes))


def n_parameters(model):
    return sum(p.numel() for p in model.parameters())


class Trainer:
    """One model's training loop; with ``world > 1`` each rank runs its slice of every batch.

    The loss on a rank is its slice's summed cross-entropy times ``world / batch``. DDP averages
    gradients over ranks, so every rank steps with the gradient of the mean loss over the whole
    batch: the same step as one process on the combined batch, also when slices are uneven.
    """

    def __init__(self, model, args, device, lr, total_steps, rank=0, world=1):
        self.args, self.device, self.rank, self.world = args, device, rank, world
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.module = model.to(device=device, memory_format=self.memory_format)
        self.model = self.module
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, max(1, total_steps))
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                       enabled=args.amp == "bf16")

    def _input(self, x):
        return x.contiguous(memory_format=self.memory_format)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_epoch(self, x, y, generator, max_steps=None):
        """One pass over (x, y) in a seeded order; returns (mean loss, accuracy, steps, seconds)."""
        self.model.train()
        order = torch.randperm(len(y), generator=generator)
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, correct, samples
        steps = 0
        self._sync()
        t0 = time.perf_counter()
        for idx in order.split(self.args.batch_size):
            if max_steps is not None and steps >= max_steps:
                break
            local = idx.tensor_split(self.world)[self.rank]
            xb, yb = self._input(x[local]), y[local]
            with self.autocast:
                logits = self.model(xb)
            loss_sum = F.cross_entropy(logits.float(), yb, reduction="sum")
            self.opt.zero_grad(set_to_none=True)
            (loss_sum * (self.world / len(idx))).backward()
            self.opt.step()
            self.schedule.step()
            stats[0] += loss_sum.detach()  # on the device: no host sync per step
            stats[1] += (logits.argmax(1) == yb).sum()
            stats[2] += len(local)
            steps += 1
        self._sync()
        seconds = time.perf_counter() - t0
        if self.world > 1:
            dist.all_reduce(stats)
        loss_sum, correct, samples = stats.tolist()
        return loss_sum / samples, correct / samples, steps, seconds

    @torch.no_grad()
    def evaluate(self, x, y):
        """(mean loss, accuracy) on (x, y), with the unwrapped module (identical on every rank)."""
        self.module.eval()
        with self.autocast:
            logits = self.module(self._input(x)).float()
        return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train_model(kind, data, args, device, rank=0, world=1, log=print):
    """Trains one model from ``args.seed``; returns its history and final figures."""
    x_train, y_train, x_test, y_test = (t.to(device) for t in data)  # 1797 images: all on device
    torch.manual_seed(args.seed)
    model = build_model(kind, args.channels, args.parameterization)
    total_steps = args.epochs * -(-len(y_train) // args.batch_size)
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    lr = LR[kind] if args.lr is None else args.lr
    trainer = Trainer(model, args, device, lr, total_steps, rank, world)
    generator = torch.Generator().manual_seed(args.seed)  # the same batches for every model
    name = f"scs-{args.parameterization}" if kind == "scs" else kind
    hist = dict(model=name, parameters=n_parameters(model), loss=[], train_acc=[], test_acc=[],
                seconds=[], steps=[])
    steps_left = args.max_steps
    for epoch in range(1, args.epochs + 1):
        loss, acc, steps, seconds = trainer.train_epoch(x_train, y_train, generator, steps_left)
        _, test_acc = trainer.evaluate(x_test, y_test)
        for key, value in zip(("loss", "train_acc", "test_acc", "seconds", "steps"),
                              (loss, acc, test_acc, seconds, steps)):
            hist[key].append(value)
        log(f"[{name}] epoch {epoch:3d}/{args.epochs}  loss {loss:.4f}  train acc {acc:6.2%}  "
            f"test acc {test_acc:6.2%}  {seconds:6.2f} s")
        if steps_left is not None:
            steps_left -= steps
            if steps_left <= 0:
                break
    # Steady-state time per step: the first epoch also pays for compilation / autotuning on GPU.
    tail = slice(1, None) if len(hist["steps"]) > 1 else slice(None)
    hist["step_seconds"] = sum(hist["seconds"][tail]) / max(1, sum(hist["steps"][tail]))
    hist["train_seconds"] = sum(hist["seconds"])
    hist["final_test_acc"] = hist["test_acc"][-1]
    hist["state_dict"] = {k: v.detach().cpu().clone() for k, v in trainer.module.state_dict().items()}
    return hist


def format_table(results):
    """Markdown table: model, parameters, test accuracy, training time, time/step vs conv2d."""
    ref = next((r["step_seconds"] for r in results if r["model"] == "conv2d"), None)
    rows = ["| model | parameters | test accuracy | training time | time/step vs conv2d |",
            "|---|---|---|---|---|"]
    for r in results:
        rel = f"{r['step_seconds'] / ref:.2f}x" if ref else "n/a"
        rows.append(f"| {r['model']} | {r['parameters']:,} | {r['final_test_acc']:.2%} | "
                    f"{r['train_seconds']:.1f} s | {rel} |")
    return "\n".join(rows)


def plot(results, path):
    """Training loss and held-out accuracy per epoch, one line per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        epochs = range(1, len(r["loss"]) + 1)
        ax_loss.plot(epochs, r["loss"], marker=".", label=r["model"])
        ax_acc.plot(epochs, [100 * a for a in r["test_acc"]], marker=".", label=r["model"])
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="held-out test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


@contextlib.contextmanager
def process_settings(args):
    """``$SCD_BACKEND`` from ``--backend`` and the CPU thread count, restored on exit.

    SCD2d takes no backend argument: every call reads ``SCD_BACKEND`` (None means "auto").
    """
    old_backend, old_threads = os.environ.get("SCD_BACKEND"), torch.get_num_threads()
    if args.backend is not None:
        os.environ["SCD_BACKEND"] = args.backend
    torch.set_num_threads(args.threads)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        if old_backend is None:
            os.environ.pop("SCD_BACKEND", None)
        else:
            os.environ["SCD_BACKEND"] = old_backend


def main(argv=None):
    """Trains ``--models`` in turn; prints progress and the table, writes the PNG; returns histories."""
    args = parse_args(argv)
    rank, world = 0, 1
    device = torch.device(args.device)
    if args.ddp:
        if "RANK" not in os.environ:
            raise SystemExit("--ddp runs under torchrun: torchrun --nproc_per_node 2 "
                             "examples/train_digits.py --ddp")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        with process_settings(args):
            data = load_data(args.seed, args.test_size, args.subset)
            backend = scd_triton.functional.resolve_backend(None, device)  # fails early if unfit
            log(f"digits: {len(data[1])} train / {len(data[3])} held-out test images; device "
                f"{device}, SCD backend {backend}, world size {world}, amp {args.amp}, "
                f"channels_last {args.channels_last}")
            results = [train_model(kind, data, args, device, rank, world, log)
                       for kind in args.models]
    finally:
        if args.ddp:
            dist.destroy_process_group()
    if args.save_state:
        Path(args.save_state).mkdir(parents=True, exist_ok=True)
        for r in results:
            torch.save(r["state_dict"], Path(args.save_state) / f"{r['model']}_rank{rank}.pt")
    log("\n" + format_table(results))
    if args.plot and rank == 0:
        plot(results, args.plot)
        log(f"learning curves: {args.plot}")
    return results


if __name__ == "__main__":
    main()
