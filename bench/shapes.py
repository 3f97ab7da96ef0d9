"""The named benchmark suite. Each row says where its layer comes from."""
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Shape:
    suite: str
    name: str
    N: int
    C: int
    O: int
    H: int      # 1 for 1-D rows
    W: int      # L for 1-D rows
    k: int
    stride: int = 1
    padding: object = "same"
    groups: int = 1
    ndim: int = 2

    @property
    def label(self):
        return f"{self.suite}/{self.name}"

    def output_numel(self):
        """N·O·OH·OW, as conv2d sizes its output ("same" keeps H and W, stride 1)."""
        side = (lambda n: n) if self.padding == "same" else (
            lambda n: (n + 2 * self.padding - self.k) // self.stride + 1)
        return self.N * self.O * (1 if self.ndim == 1 else side(self.H)) * side(self.W)

    def flops(self):
        """2·N·O·OH·OW·(C/G)·k^ndim: the multiply-adds of the dot products."""
        return 2 * self.output_numel() * (self.C // self.groups) * self.k ** self.ndim


SUITE = [
    # Rohrer's CIFAR-10 gallery network cifar10_80_25214 (batch 64)
    Shape("cifar10_80_25214", "scs5x5_3-80_32", 64, 3, 80, 32, 32, 5),
    Shape("cifar10_80_25214", "dw3x3_80_16", 64, 80, 80, 16, 16, 3, groups=80),
    Shape("cifar10_80_25214", "pw1x1_80-40_16", 64, 80, 40, 16, 16, 1),
    Shape("cifar10_80_25214", "scs3x3_40-40_8", 64, 40, 40, 8, 8, 3),
    # a wider CIFAR SCS network in the style of the 1.2M-parameter one (batch 128)
    Shape("cifar_wide", "scs3x3_128-128_32", 128, 128, 128, 32, 32, 3),
    Shape("cifar_wide", "scs3x3_128-256_16", 128, 128, 256, 16, 16, 3),
    Shape("cifar_wide", "scs3x3_256-256_8", 128, 256, 256, 8, 8, 3),
    # ResNet-18-like 3×3 layers (batch 32)
    Shape("resnet18", "3x3_64_56", 32, 64, 64, 56, 56, 3),
    Shape("resnet18", "3x3_128_28", 32, 128, 128, 28, 28, 3),
    Shape("resnet18", "3x3_256_14", 32, 256, 256, 14, 14, 3),
    Shape("resnet18", "3x3_512_7", 32, 512, 512, 7, 7, 3),
    Shape("resnet18", "3x3s2_64-128_56", 32, 64, 128, 56, 56, 3, stride=2, padding=1),
    # 1-D (batch 32)
    Shape("conv1d", "k3_128_L4096", 32, 128, 128, 1, 4096, 3, ndim=1),
    Shape("conv1d", "k7_256_L1024", 32, 256, 256, 1, 1024, 7, ndim=1),
]

# CPU: the same layers at a batch that keeps `make bench` under five minutes on two cores.
CPU_BATCH = {"cifar10_80_25214": 4, "cifar_wide": 2, "resnet18": 1, "conv1d": 2}


def suite(full: bool, device_type: str):
    if full or device_type != "cpu":
        return list(SUITE)
    return [replace(s, N=CPU_BATCH[s.suite]) for s in SUITE]
