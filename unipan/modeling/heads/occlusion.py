"""The occlusion network of REFINE's Soft Occlusion Estimation (Ren et al., AAAI 2021, Fig. 4).

For an ordered pair of instances (i, j) it predicts O(i, j) in [0, 1], "i occludes j". The paper's
"strong baseline" follows OCFusion's order head (Lazarow, Lee, Tu 2020) and adds the class prior;
the layout is that of BCC-Net's occlusion head, mode "feature+mask+label" (REFINE's predecessor by
the same first author):

- input per pair: [feat_i ; feat_j] (2 x E channels, R x R RoI features) and
  [maxpool2(mask_i) ; maxpool2(mask_j)] (2 channels, the 2R x 2R mask probabilities pooled to R);
- `num_convs` 3x3 convs + ReLU, the last with stride 2 (R -> R/2);
- flatten, concatenate one-hot(label_i) and one-hot(label_j) (2T), FC + ReLU, FC + ReLU, FC -> 1.

`inputs` is the ablation of the paper's Table 6: any non-empty subset of {"mask", "feature"} feeds
the convs, "label" the first FC. Initialisation: Kaiming-normal convs, Kaiming-uniform (a=1) FCs,
N(0, 0.01) for the last layer (BCC-Net).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OCCLUSION_INPUTS", "OcclusionHead"]

OCCLUSION_INPUTS = ("mask", "feature", "label")


class OcclusionHead(nn.Module):
    """Pairwise occlusion logits (see the module docstring).

    Args:
        inputs: subset of ("mask", "feature", "label") with "mask" or "feature".
        feature_channels: E, channels of the RoI features.
        num_things: T (one-hot width of the labels).
        resolution: R, side of the RoI features (masks are 2R).
        num_convs: 3x3 convs (>= 1; BCC-Net 4).
        conv_channels: their channels (512).
        fc_dim: width of the two hidden FCs (1024).
    """

    def __init__(
        self,
        *,
        inputs: Sequence[str],
        feature_channels: int,
        num_things: int,
        resolution: int = 14,
        num_convs: int = 4,
        conv_channels: int = 512,
        fc_dim: int = 1024,
    ) -> None:
        super().__init__()
        unknown = sorted(set(inputs) - set(OCCLUSION_INPUTS))
        if unknown:
            raise ValueError(f"occlusion inputs {unknown} unknown; choose from {list(OCCLUSION_INPUTS)}")
        if not {"mask", "feature"} & set(inputs):
            raise ValueError(f"occlusion inputs {list(inputs)} need 'mask' or 'feature' (the conv input)")
        if num_convs < 1:
            raise ValueError(f"the occlusion head needs at least one conv, got num_convs={num_convs}")
        self.use_mask = "mask" in inputs
        self.use_feature = "feature" in inputs
        self.use_label = "label" in inputs
        self.num_things = int(num_things)
        in_channels = 2 * int(self.use_mask) + 2 * feature_channels * int(self.use_feature)
        convs: list[nn.Module] = []
        for k in range(num_convs):
            stride = 2 if k == num_convs - 1 else 1
            conv = nn.Conv2d(in_channels if k == 0 else conv_channels, conv_channels, 3, stride=stride, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)  # type: ignore[arg-type]  # made with bias
            convs += [conv, nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*convs)
        side = (resolution + 1) // 2
        fc_in = conv_channels * side * side + 2 * self.num_things * int(self.use_label)
        self.fc1 = nn.Linear(fc_in, fc_dim)
        self.fc2 = nn.Linear(fc_dim, fc_dim)
        self.logit = nn.Linear(fc_dim, 1)
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.logit.weight, std=0.01)
        nn.init.zeros_(self.logit.bias)

    def forward(self, features: Tensor, mask_probs: Tensor, labels: Tensor, pairs: Tensor) -> Tensor:
        """Occlusion logits of ordered pairs.

        Args:
            features: FloatTensor[K, E, R, R] RoI features of K instances.
            mask_probs: FloatTensor[K, 2R, 2R] their mask probabilities.
            labels: LongTensor[K] their thing indices.
            pairs: LongTensor[P, 2] (i, j) rows into the K instances.

        Returns:
            FloatTensor[P] logits of "i occludes j" (sigmoid gives O(i, j)).
        """
        i, j = pairs[:, 0], pairs[:, 1]
        parts: list[Tensor] = []
        if self.use_feature:
            parts += [features[i], features[j]]
        if self.use_mask:
            pooled = F.max_pool2d(mask_probs[:, None], 2)
            parts += [pooled[i], pooled[j]]
        x = self.convs(torch.cat(parts, dim=1)).flatten(1)
        if self.use_label:
            onehot = F.one_hot(labels, self.num_things).to(x.dtype)
            x = torch.cat([x, onehot[i], onehot[j]], dim=1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.logit(x)[:, 0]
