"""A small 1D CNN for phone activity recognition."""

import torch
from torch import nn

NUM_CLASSES = 6


class HarCNN(nn.Module):
    """Three 1D convolutions over 6-channel, 128-sample windows (about 32k parameters).

    The model has no batch normalization, so its state is only weights and
    biases: every entry of the state dict is a trainable float32 tensor that the
    update codecs compress, and non-IID clients cannot skew running statistics.
    """

    def __init__(self, in_channels: int = 6, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, 32, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(32, 64, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(64, 64, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
        )
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map windows of shape (batch, channels, samples) to class logits."""
        return self.classifier(self.features(x).flatten(1))


def build_model(seed: int | None = None) -> HarCNN:
    """Create the model, with weights drawn from `seed` when one is given."""
    if seed is None:
        return HarCNN()

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = HarCNN()
    torch.random.set_rng_state(generator_state)
    return model


# Layers whose output channels feed the next layer's input channels through
# channel-wise layers only (ReLU, pooling): what channel pruning may narrow.
CHANNEL_CHAIN = ("features.0", "features.3", "features.6", "classifier")
