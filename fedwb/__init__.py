"""fedwb: asynchronous edge federation over MQTT with FedAvg and Wasserstein-barycenter fusion."""

__version__ = "0.1.0"
