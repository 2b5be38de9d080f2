"""ClientApp: return the received weights plus Gaussian noise (std ``noise``), like fedwb's ``noop`` task."""

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """w_i = w + noise * N(0, 1), reported with one example so FedAvg weighs clients equally."""
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    noise = float(msg.content["config"].get("noise", 1e-3))
    rng = np.random.default_rng()
    out = [a + (noise * rng.standard_normal(a.shape)).astype(a.dtype) for a in arrays]
    content = RecordDict({"arrays": ArrayRecord(out), "metrics": MetricRecord({"num-examples": 1})})
    return Message(content=content, reply_to=msg)
