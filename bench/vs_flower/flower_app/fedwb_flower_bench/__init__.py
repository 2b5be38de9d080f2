"""fedwb's Flower benchmark app: the `noop` job (FedAvg, no training) on Flower's Deployment Engine."""
