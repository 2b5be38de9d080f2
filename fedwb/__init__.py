"""fedwb: asynchronous edge federation over MQTT with FedAvg and Wasserstein-barycenter fusion."""

__version__ = "0.1.0"


def executable() -> str:
    """Path of the ``fedwb`` console script of this interpreter's environment (for subprocesses)."""
    import os
    import sys

    return os.path.join(os.path.dirname(sys.executable), "fedwb")
