"""lenet_sweep: experiment-tracked training and hyperparameter sweeps for image classifiers."""
import os

# The input pipeline is tf.data and the ReLU-output loss semantics are TensorFlow's (models/lenet.py):
# pin the backend before anything imports Keras. An explicit other KERAS_BACKEND is refused in models/.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
