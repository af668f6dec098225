"""lenet_sweep: experiment-tracked training and hyperparameter sweeps for image classifiers."""

import os

# The input pipeline is tf.data and the ReLU-output loss semantics are TensorFlow's (models/lenet.py):
# pin the backend before anything imports Keras. An explicit other KERAS_BACKEND is refused in models/.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# TensorFlow turns its oneDNN CPU kernels on by default only on CPUs with AVX-512 VNNI/BF16/AMX; on
# AVX2 CPUs such as this project's AMD EPYC they are off, and turning them on made the modified LeNet's
# training steps 1.5-1.8x faster and its convolutions 2-5x faster (docs/RESULTS.md). TensorFlow reads
# the variable once, when it loads, so it is set here rather than in conf/; export
# TF_ENABLE_ONEDNN_OPTS=0 to train with Eigen's kernels. Each run logs the value it trained with.
# LENET_SWEEP_TF_DEFAULTS=1 leaves TensorFlow's own choice (the benchmark's plain-Keras baseline).
if os.environ.get("LENET_SWEEP_TF_DEFAULTS") != "1":
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
