"""The trainer: ``python -m lepton_tasks.trainer`` inside each partner's container (see ``__main__``).

TensorFlow's C++ runtime logs at ERROR level for harmless version skew (``NodeDef mentions attribute
use_unbounded_threadpool …`` once per tf.data pipeline), which reads as a failure in every task log; real
failures raise Python exceptions, which are not affected. So its C++ log level is set before any module of
this package imports TensorFlow (an explicit ``TF_CPP_MIN_LOG_LEVEL`` in the environment still wins).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
