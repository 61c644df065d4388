"""Training clips from a folder of videos (decoded with PyAV, resized on the short side, centre-cropped)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ca2vdm.server.media import read_video

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi"}


class VideoFolderDataset(Dataset):
    """Item i: `num_frames` consecutive frames of video i % N from a seeded offset, (3, T, H, W) uint8."""

    def __init__(self, folder: str | Path, size: tuple[int, int], num_frames: int, seed: int = 0) -> None:
        self.files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
        if not self.files:
            raise FileNotFoundError(f"no videos ({', '.join(sorted(VIDEO_SUFFIXES))}) under {folder}")
        self.size, self.num_frames, self.seed = size, num_frames, seed

    def __len__(self) -> int:
        return len(self.files) * 100  # many windows per video

    def __getitem__(self, i: int) -> torch.Tensor:
        video = read_video(self.files[i % len(self.files)])  # (T, H, W, 3) uint8
        if video.shape[0] < self.num_frames:
            raise ValueError(f"{self.files[i % len(self.files)]} has {video.shape[0]} frames, need {self.num_frames}")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        start = int(torch.randint(0, video.shape[0] - self.num_frames + 1, (1,), generator=gen))
        clip = video[start : start + self.num_frames].permute(0, 3, 1, 2).float()  # (T, 3, H, W)
        h, w = self.size
        scale = max(h / clip.shape[2], w / clip.shape[3])
        clip = F.interpolate(clip, size=(round(clip.shape[2] * scale), round(clip.shape[3] * scale)),
                             mode="bilinear", antialias=True, align_corners=False)  # fmt: skip
        top, left = (clip.shape[2] - h) // 2, (clip.shape[3] - w) // 2
        clip = clip[:, :, top : top + h, left : left + w]
        return clip.round().clamp(0, 255).to(torch.uint8).permute(1, 0, 2, 3).contiguous()  # (3, T, H, W)
