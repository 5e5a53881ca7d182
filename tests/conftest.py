"""Test configuration: select tf-keras and silence TensorFlow's C++ logging.

Both variables must be set before anything imports TensorFlow.
"""

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
os.environ["TF_USE_LEGACY_KERAS"] = "1"
