"""A trained speech-embedding stand-in for dynamic quantization: a stacked LSTM (or GRU) over power-mel-like
frames, with a linear + relu + L2-norm embedding out, trained for a few seconds on synthetic data.

Why trained: random-init recurrent models keep their accuracy under int8 (their weights do not respond to
small differences in the inputs); a briefly trained one, fed wide-range, heavy-tailed features (the power
spectrum of speech: ``exp`` of normals, several decades between quiet and loud bands), loses it under plain
per-tensor dynamic int8, as trained speech models do. Everything is seeded: the same call gives the same model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SpeechEmbedder", "power_mel_frames", "trained_speech_embedder"]


class SpeechEmbedder(nn.Module):
    """``rnn`` over (batch, time, bands) frames, last step -> linear -> relu -> L2-normalised embedding."""

    def __init__(self, bands: int = 40, hidden: int = 128, layers: int = 3, embedding: int = 64,
                 rnn: str = "lstm", bidirectional: bool = False) -> None:
        super().__init__()
        kind = {"lstm": nn.LSTM, "gru": nn.GRU}[rnn]
        self.rnn = kind(bands, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.proj = nn.Linear(hidden * (2 if bidirectional else 1), embedding)

    def forward(self, frames: Tensor) -> Tensor:
        out, _ = self.rnn(frames)
        return F.normalize(torch.relu(self.proj(out[:, -1])), dim=-1)


def power_mel_frames(speakers: Tensor, steps: int, generator: torch.Generator, spread: float = 2.0) -> Tensor:
    """Frames of the given speakers: ``exp`` of each speaker's log-spectrum profile plus heavy-tailed noise
    (``spread`` in natural-log units), shape (len(speakers), steps, bands). ``speakers``: rows of profiles."""
    batch, bands = speakers.shape
    noise = torch.randn(batch, steps, bands, generator=generator) * spread
    loudness = torch.randn(batch, 1, 1, generator=generator) * spread  # whole utterances louder or quieter
    return torch.exp(speakers[:, None, :] + noise + loudness)


def trained_speech_embedder(seed: int = 0, *, hidden: int = 128, layers: int = 3, rnn: str = "lstm",
                            bidirectional: bool = False, train_steps: int = 60, steps: int = 20,
                            speakers: int = 16, bands: int = 40) -> tuple[SpeechEmbedder, Tensor]:
    """(a SpeechEmbedder trained to tell ``speakers`` synthetic speakers apart, held-out frames (32, steps, bands)).

    Trained with Adam on the raw power frames (no log compression, as the models that break under int8 are),
    through a linear speaker classifier on the embedding that is dropped afterwards. Seeded and fast."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    profiles = torch.randn(speakers, bands, generator=g) * 1.5
    model = SpeechEmbedder(bands, hidden, layers, rnn=rnn, bidirectional=bidirectional)
    head = nn.Linear(model.proj.out_features, speakers)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(train_steps):
        labels = torch.randint(speakers, (32,), generator=g)
        loss = F.cross_entropy(head(model(power_mel_frames(profiles[labels], steps, g))) * 10, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_out = power_mel_frames(profiles[torch.randint(speakers, (32,), generator=g)], steps, g)
    return model.eval(), held_out
