"""tf.data input: decoded uint8 splits as batches scaled to [0, 1] on the fly."""

from __future__ import annotations

from typing import Any, Optional

from lenet_sweep.data.decode import DecodedSplit

PREFETCH = 2  # batches made ahead, in tf.data's one background thread, while the model trains on the current one


def make_dataset(split: DecodedSplit, batch_size: int, shuffle: bool, seed: int = 0, epoch: Optional[Any] = None):
    """Batches of (float32 images in [0, 1], int32 labels), in a new order every epoch when `shuffle`.

    Epoch e's order is a permutation drawn from (seed, e) alone, e read from `epoch` (an int64
    `tf.Variable` a callback sets as each epoch begins: `trial.EpochCounter`) as each batch is drawn, so a
    training resumed at epoch e sees exactly the batches an uninterrupted one saw. That holds because Keras
    starts a new iterator after `on_epoch_begin` when `fit` has no `steps_per_epoch`, as every run trains;
    with `steps_per_epoch` (the speed benchmark's partial epochs) prefetched batches may straddle two epochs.
    Gathering each batch by index keeps one copy of the images in memory.
    """
    import tensorflow as tf

    if shuffle and epoch is None:
        raise ValueError("a shuffled dataset needs the epoch variable its order is drawn from")
    images = tf.constant(split.images)
    labels = tf.constant(split.labels)
    n = len(split.labels)

    def batch_of(idx):  # idx: (batch,) int64 positions in the epoch
        if shuffle:
            idx = tf.random.experimental.index_shuffle(
                idx, tf.stack([tf.constant(seed, tf.int64), epoch.read_value()]), n - 1
            )
        return tf.cast(tf.gather(images, idx), tf.float32) / 255.0, tf.gather(labels, idx)

    # One function call per batch, made in order by the prefetch thread, with tf.data's autotuning off: a
    # batch costs ~0.5 ms of one core at 32 px and ~1.5 ms at 128 px, while the training step keeps both of
    # this machine's cores busy; a parallel map and the autotuner only add threads competing with it (with
    # them, LeNet-5's median epoch in fit was 20-30 % slower in rough timings on a loaded machine; measure
    # with benchmarks/feeding.py). The batches are the same, bit for bit (tests/test_bench.py).
    ds = tf.data.Dataset.range(n).batch(batch_size).map(batch_of).prefetch(PREFETCH)
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)
