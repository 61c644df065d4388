"""Render a procedural-sprites scene's first frame as a player sample image (the default model's domain).

    python scripts/render_sample.py SEED OUT.png [--scale 8]

The frame is rendered at the default model's 32x32 and enlarged with nearest-neighbour pixels, so the server's
resize back to 32x32 gives (nearly) the rendered frame again.
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from ca2vdm.server.train.sprites import SpritesConfig, render_clip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seed", type=int)
    parser.add_argument("out")
    parser.add_argument("--scale", type=int, default=8)
    args = parser.parse_args()
    frames, state = render_clip(SpritesConfig(num_frames=1), args.seed)
    big = np.repeat(np.repeat(frames[0], args.scale, 0), args.scale, 1)
    Image.fromarray(big).save(args.out, optimize=True)
    looks = ", ".join(f"{s.shape} r={s.radius:.1f}" for s in state.sprites)
    print(f"seed {args.seed}: {len(state.sprites)} sprites ({looks}); gradient={state.background.is_gradient}")


if __name__ == "__main__":
    main()
