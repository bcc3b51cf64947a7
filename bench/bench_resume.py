"""How long a resumed training stream takes to its first batch, early and late in a run.

    python bench/bench_resume.py [--early 10000] [--late 1000000] [--repeats 3]

Generated shards (200 shards of 500 small JPEG + caption samples, drawn with replacement as
pretraining draws them; shuffle buffer 5000 as the recipes have it). For each resume point
(``--early`` and ``--late`` samples consumed by the worker) the stream is run to that point
once without decoding (not timed: it stands for the training before the checkpoint), its
saved position goes through the checkpoint's form, and a fresh loader is timed from its
construction to its first batch (decoded, as training takes it). The ratio late / early is
what a run pays at its late checkpoints compared with its early ones; the stream that replayed
everything it had consumed paid in proportion to it (the replay rate is printed beside).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_tools.mixture import load_mixture  # noqa: E402
from data_tools.shard_writer import Sample, shard_pattern, write_shard, write_sizes  # noqa: E402
from data_tools.synthetic import COLORS, SHAPES, caption_for, render  # noqa: E402
from pretrain.data import ImageTextCollator, ImageTextDecoder, train_transform  # noqa: E402
from pretrain.engine.shard_stream import ShardStream  # noqa: E402
from pretrain.engine.stream import StreamState, TrainLoader, WorkerPosition  # noqa: E402
from pretrain.engine.threads import apply_thread_policy  # noqa: E402

SHARDS, PER_SHARD, BUFFER, BATCH = 200, 500, 5000, 64


def write_shards(root: Path) -> str:
    import io
    import random

    rng = random.Random(0)
    encoded = []
    for _ in range(64):
        color, background = rng.sample(list(COLORS), 2)
        shape = rng.choice(SHAPES)
        image = render(color, shape, background, 32, rng)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        encoded.append((buffer.getvalue(), caption_for(color, shape, background)))
    for shard in range(SHARDS):
        write_shard(root, shard, [Sample(*encoded[(shard * PER_SHARD + i) % 64])
                                  for i in range(PER_SHARD)])
    write_sizes(root)
    return shard_pattern(root, SHARDS)


def stream(pattern: str, state: StreamState) -> ShardStream:
    return ShardStream(load_mixture(pattern), ImageTextDecoder(train_transform(32, (0.9, 1.0))),
                       ImageTextCollator(lambda captions: captions), batch_size=BATCH, seed=0,
                       rank=0, num_workers=0, shuffle_buffer=BUFFER, shuffle_initial=BUFFER,
                       state=state)


def position_after(pattern: str, consumed: int) -> tuple[dict, float]:
    """The checkpoint's form of the worker's state after ``consumed`` samples, and the rate
    (samples/s) at which the stream read them without decoding."""
    state = StreamState.fresh(0)
    worker_pass = stream(pattern, state).worker_pass(0, WorkerPosition())
    started = time.perf_counter()
    for _ in itertools.islice(worker_pass.items, consumed):
        pass
    rate = consumed / (time.perf_counter() - started)
    state.workers[0] = worker_pass.position(consumed)
    return json.loads(json.dumps(state.to_dict())), rate


def time_to_first_batch(pattern: str, saved: dict) -> float:
    started = time.perf_counter()
    loader = TrainLoader(stream(pattern, StreamState.from_dict(saved)), 0)
    next(loader)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--early", type=int, default=10_000)
    parser.add_argument("--late", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    apply_thread_policy()
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_shards(Path(tmp))
        saved, rates = {}, {}
        for consumed in (args.early, args.late):
            saved[consumed], rates[consumed] = position_after(pattern, consumed)
            print(f"position after {consumed:,} samples: read without decoding at "
                  f"{rates[consumed]:,.0f} samples/s (a replay of it: "
                  f"{consumed / rates[consumed]:.1f} s)", flush=True)
        times = {consumed: [] for consumed in saved}
        for _ in range(args.repeats):
            for consumed in saved:
                times[consumed].append(time_to_first_batch(pattern, saved[consumed]))
    for consumed, measured in times.items():
        print(f"resume at {consumed:>9,} consumed: first batch in "
              f"{statistics.median(measured):.3f} s (runs: "
              f"{', '.join(f'{t:.3f}' for t in measured)})")
    ratios = [late / early for early, late in zip(times[args.early], times[args.late],
                                                  strict=True)]
    print(f"ratio late / early: {statistics.median(ratios):.2f} (median of "
          f"{', '.join(f'{r:.2f}' for r in ratios)}; {args.late // args.early}x the samples)")


if __name__ == "__main__":
    main()
