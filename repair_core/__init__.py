"""Find the training examples behind a classifier's failures and erase their influence.

Tensor conventions used across the package: images are float32 tensors of shape
(N, C, H, W) with values in [0, 1], labels are int64 tensors of shape (N,), and
scores over the training set have shape (n_train,) with higher meaning more
harmful to the chosen failures.
"""

__version__ = "0.1.0"
