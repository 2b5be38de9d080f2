"""ServerApp: Flower's FedAvg over all ``num-clients`` nodes, timed round by round.

Each round: ``configure_train`` -> ``grid.send_and_receive`` -> ``aggregate_train`` (Flower's own
FedAvg). After every round one JSON line goes to ``out-file``: the round, when it was sent, when
the last reply arrived ("quorum complete"), when aggregation ended, and how many replies came.
"""

import json
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


def _wait_for_nodes(grid: Grid, n: int, timeout: float) -> float:
    """Poll until ``n`` SuperNodes are connected; seconds waited."""
    t0 = time.monotonic()
    while len(list(grid.get_node_ids())) < n:
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"only {len(list(grid.get_node_ids()))} of {n} SuperNodes connected")
        time.sleep(0.2)
    return time.monotonic() - t0


def _write(path: str, record: dict) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    n, rounds, out = int(cfg["num-clients"]), int(cfg["num-rounds"]), str(cfg["out-file"])
    waited = _wait_for_nodes(grid, n, float(cfg["node-wait-timeout"]))
    _write(out, {"event": "nodes", "nodes": n, "waited": waited, "at": time.time()})
    rng = np.random.default_rng(0)
    arrays = ArrayRecord([(0.1 * rng.standard_normal(int(cfg["num-params"]))).astype(np.float32)])
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
    for r in range(1, rounds + 1):
        sent_at = time.time()
        messages = strategy.configure_train(r, arrays, ConfigRecord({"noise": float(cfg["noise"])}), grid)
        replies = list(grid.send_and_receive(messages, timeout=float(cfg["round-timeout"])))
        replies_at = time.time()
        fused, _ = strategy.aggregate_train(r, replies)
        if fused is not None:
            arrays = fused
        ok = sum(1 for m in replies if not m.has_error())
        _write(out, {"event": "round", "round": r, "sent_at": sent_at, "replies_at": replies_at,
                     "aggregated_at": time.time(), "replies": ok})
